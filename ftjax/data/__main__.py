"""`python -m ftjax.data check --config configs/<name>.py [--config.a.b=v ...] [--out DIR]`.

The command lives in ftjax/data_check.py: it loads the model, the run's objective and the cost
probe, all of which sit above the data package (docs/design.md, "Layers"), so this file only
starts that program, as `python -m ftjax.data_check` would.
"""

import runpy

runpy.run_module("ftjax.data_check", run_name="__main__", alter_sys=True)
