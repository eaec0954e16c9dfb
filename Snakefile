# emlab: emergent misalignment experiments as a Snakemake workflow.
#   snakemake --profile workflow/profiles/default --cores all          (see README)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/organism.smk"
include: "rules/datasets.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
