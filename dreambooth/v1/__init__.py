"""Generated from proto/dreambooth/v1 by scripts/gen-proto: do not edit."""
