"""The `nag` command and its subcommands (bench, generate, skip-sweep, study, inspect, ...), on top of the model, data and Lightning layers."""
