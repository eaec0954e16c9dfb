# emlab: emergent misalignment experiments as a Snakemake workflow.
#   snakemake --profile workflow/profiles/default --cores all          (see README)
from snakemake.utils import min_version

min_version("9.0")


# A run's config is config.yaml, or instead the files given with --configfile (each merged key by key on the one
# before, --config on top): a real-model config is a whole config on the schema's defaults and does not inherit
# the organism's settings. To change a few keys of the default run, pass config.yaml first (the findings run:
# config.yaml, then configs/organism-findings.yaml).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"


# The persona world is every run's offline data source (emlab.plan); the base model is the organism built from
# it, or a pretrained chat model (hub) with its question files and any synthesized or imported sets.
if PLAN.world_data:

    include: "rules/world.smk"


if ORGANISM:

    include: "rules/organism.smk"

else:

    include: "rules/hub.smk"


include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


if DIFFING:

    include: "rules/diffing.smk"


if PLAN.alarm:

    include: "rules/alarm.smk"


if PLAN.realign:

    include: "rules/realign.smk"


if PLAN.prevent:

    include: "rules/prevent.smk"


if PLAN.controls:

    include: "rules/controls.smk"


if STEERING:

    include: "rules/steering.smk"


if MONITORS:

    include: "rules/monitors.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
