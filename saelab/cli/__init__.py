"""The command line: commands (`app`, the `saelab` entry point `main`), options generated from
config dataclasses (`options`), and what `saelab train` composes (`pipeline`)."""
