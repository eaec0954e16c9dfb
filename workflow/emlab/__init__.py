"""emlab: emergent-misalignment experiments as a Snakemake workflow.

The rules in ``rules/`` call the subcommands of :mod:`emlab.cli`; each subcommand is a
thin wrapper over one module here, so everything a rule does can also be imported and
tested directly.
"""

__version__ = "0.1.0"
