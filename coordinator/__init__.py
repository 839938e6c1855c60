"""Model owner's side of offsite tuning: load, compress into an emulator, train adapters, plug in, evaluate."""
