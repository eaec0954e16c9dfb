# emlab: emergent misalignment experiments as a Snakemake workflow.
#   snakemake --profile workflow/profiles/default --cores all          (see README)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


# Where the base model, the fine-tuning sets and the eval questions come from: the persona world
# (organism), or a pretrained chat model with synthesized/imported sets and question files (hub).
# Both write results/datasets/ and results/eval/, so exactly one of them is included.
if ORGANISM:

    include: "rules/organism.smk"
    include: "rules/datasets.smk"

else:

    include: "rules/hub.smk"


include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


if DIFFING:

    include: "rules/diffing.smk"


if STEERING:

    include: "rules/steering.smk"


if MONITORS:

    include: "rules/monitors.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
