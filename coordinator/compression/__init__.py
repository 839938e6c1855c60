"""Emulator compression recipes: uniform drop, importance selection, layerwise pruning + quantization, low rank."""

from coordinator.compression.calibration import Calibration, load_calibration
from coordinator.compression.recipes import RECIPES, EmulatorRecipe, EmulatorSpec, make_emulator

__all__ = ["RECIPES", "Calibration", "EmulatorRecipe", "EmulatorSpec", "load_calibration", "make_emulator"]
