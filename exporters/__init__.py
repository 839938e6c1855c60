"""Turns an emulator and adapter into device artifacts (ONNX Runtime training, later GGUF)."""
