"""`dforge serve`: a local Gradio page over a folder of runs (``pip install -e ".[serve]"``).

=============  ===============================================================
``catalog``    the runs under RUNS_DIR: task, preset, steps, time, metrics,
               loss curve, the sample grids over training (read from files)
``models``     ``ModelCache``: each run's model loaded once and kept, one
               request at a time per model
``files``      uploads in the run's mode, painted masks, result PNGs with the
               settings in their text chunks
``generate``   Generate tab: a Gaussian run's grid and its `dforge sample` command
``translate``  Translate tab: a bridge run's translation of an upload or test image
``story``      Story tab: a story run's strip, yielded frame by frame
``app``        the ``gr.Blocks`` page wiring the tabs to those; ``launch``
=============  ===============================================================

Only ``app`` imports Gradio; the others call the same library functions as
the CLI commands, so the page and the command give the same images.
"""
