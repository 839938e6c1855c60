"""The emulator and adapter defaults of `coordinator export`, `evaluate`, `fleet dispatch` and `make demo`.

Chosen on 600 reviews carved from the movie-review training file (never the test file) by `python -m bench.utility`
and `python -m bench.recipe_choice`: on SmolLM2-135M with a 2+2 adapter, remove the 4 middle layers whose removal
moves the predictions least (`greedy`, keep 22 of 26) and fit a rank-64 harmonizer in place of each removed run
(`harmonize=64`, ScaleOT). Its adapter plugs in 0.7 points under the full fine-tune while the emulator with that
adapter stays 5.2 under the plug-in; without harmonizers that margin was 3.2 (1.5 on the test file), and at one
half or one third of the middle no adapter carries over.
`bench.five_settings` scores the choice on the test files.
"""

DEFAULT_EMULATOR = "greedy:harmonize=64"  # recipe spec, see `coordinator export --help`; keep comes from --keep
DEFAULT_KEEP = 22  # middle layers the emulator keeps (SmolLM2-135M, 2+2 adapter: 26 middle layers)
DEFAULT_LR = 1e-4  # adapter learning rate (AdamW, linear warm-up and decay)
