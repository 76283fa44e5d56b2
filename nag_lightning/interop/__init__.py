"""Using a trained model outside this package: Hugging Face export and lm-eval evaluation."""
