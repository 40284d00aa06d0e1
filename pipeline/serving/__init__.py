"""The serving bundle: its layout and checks, the ONNX user tower, and the ``Retriever``."""
