"""ftcli: fine-tune Hugging Face Transformers models for text classification from a YAML file."""

__version__ = "0.1.0"
