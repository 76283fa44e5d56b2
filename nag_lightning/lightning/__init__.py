"""The Lightning layer: the LightningModule, its callbacks and guards, the Trainer and LightningCLI of `nag fit`, TensorBoard, precision and memory."""
