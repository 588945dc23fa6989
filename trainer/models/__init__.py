"""Model families (`registry.py` names them; `family.py` says what one is) and what they share:
mesh-independent initialisation (`init.py`) and the parallelism every family applies alike
(`parallel.py`)."""
