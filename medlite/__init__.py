"""medlite: TinyLLaVA-Med to Jetson Xavier artifacts."""
__version__ = "0.1.0"
