"""fae: Feature Auto-Encoders on frozen vision encoders, with generators and evaluation."""

__version__ = "0.1.0"
