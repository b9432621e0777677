"""diffusionforge: the diffusion-model family in one coherent codebase.

See ``README.md`` for the two commands that install, train and test, and
``docs/ARCHITECTURE.md`` for the architecture: processes own the
mathematics, samplers walk a process with a ``denoise(x, t, cond)`` callable,
backbones map ``(x, t, cond) -> tensor``, conditioners turn a batch into a
dict keyed by how it is injected, tasks wire them into runs, and Lightning
runs training.
"""

__version__ = "0.1.0"
