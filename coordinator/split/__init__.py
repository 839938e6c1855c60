"""Split learning (SFPrompt): the device trains a soft prompt on the first layers, the server runs the rest."""
