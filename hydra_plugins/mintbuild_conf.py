"""Registers mintbuild's OmegaConf resolvers when `dvc exp run` (Hydra enabled) composes conf/ itself.

DVC loads the Hydra plugins found under hydra_plugins/ on the repository root before it composes; importing this
module is all it takes. `mintbuild compose` registers the same resolvers from mintbuild.config.
"""

from mintbuild.config import register_resolvers

register_resolvers()
