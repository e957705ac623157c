"""`phi2 serve`: one resident process that keeps the libraries imported and the model loaded.

`phi2 summarize` and `phi2 evaluate` hand their work to it when one runs (same user, same
environment, same phi2cli), so they skip importing torch and transformers and reading the model:
the part of their wall time no code inside one fresh process can remove.
"""
