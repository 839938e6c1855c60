"""The emulator and adapter defaults of `coordinator export`, `evaluate`, `fleet dispatch` and `make demo`.

Chosen on 600 reviews carved from the movie-review training file (never the test file) by `python -m bench.utility`:
on SmolLM2-135M with a 2+2 adapter, removing the 4 middle layers whose removal moves the predictions least
(`greedy`, keep 22 of 26) is the emulator whose adapter carries over to the full model; at one half or one third
of the middle, every recipe measured ends at the full model's zero-shot. `bench.five_settings` scores the choice.
"""

DEFAULT_EMULATOR = "greedy"  # recipe spec, see `coordinator export --help`
DEFAULT_KEEP = 22  # middle layers the emulator keeps (SmolLM2-135M, 2+2 adapter: 26 middle layers)
DEFAULT_LR = 1e-4  # adapter learning rate (AdamW, linear warm-up and decay)
