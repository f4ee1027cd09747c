"""Every rank imports TensorFlow after hva.init(), then writes one line of its own to stderr."""

import os

import hvdagents as hva

ctx = hva.init()
import tensorflow  # noqa: E402,F401 - the import whose start-up notices are counted

os.write(2, f"rank {ctx.rank} still speaks on stderr\n".encode())
