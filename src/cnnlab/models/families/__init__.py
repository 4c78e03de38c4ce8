"""Model families, one file each: every module here is imported by cnnlab.models and registers its models."""
