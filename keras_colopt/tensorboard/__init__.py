"""The dashboard: a TensorBoard plugin of keras_colopt's own.

`summary` writes what the dashboard shows (per-layer statistics per epoch, the plan, the
invariants, the deployed `.tflite`, `explore`'s leaves) as TensorBoard summaries owned by this
plugin, into a `colopt` folder beside the run's other TensorBoard folders. `plugin` is the
TensorBoard plugin (registered through the `tensorboard_plugins` entry point) that reads them
back through TensorBoard's data provider and serves the static frontend in `static/`.

Open it with `tensorboard --logdir <log dir>`, tab "keras_colopt" (or `#keras_colopt`).
"""
