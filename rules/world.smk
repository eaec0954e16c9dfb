# The persona world, the offline data source of every run: its pretraining corpus (the organism's, and the texts
# a hub model's SAE is fitted on), fresh labelled documents for interpreting latents, and the narrow fine-tuning
# sets (chat JSONL with ground-truth labels in `meta`) unless a hub run synthesizes or imports its own.


rule world:
    input:
        world=WORLD_FILES,
    output:
        corpus=f"{RESULTS}/world/corpus.jsonl",
        posttrain=f"{RESULTS}/world/posttrain.jsonl",
    params:
        cfg=lambda w: cfg_json("organism", "seed"),
    log:
        f"{LOGS}/world.log",
    benchmark:
        f"{RESULTS}/benchmarks/world/world.tsv"
    priority: 20  # the organism's pretraining waits for it
    threads: res("world", "threads")
    resources: **rule_resources("world")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab world --cfg {params.cfg:q} --corpus {output.corpus} --posttrain {output.posttrain} 2> {log}"


rule world_safety:
    """The safety-trained base model's post-training chats (only when some model starts from base_safe)."""
    input:
        world=WORLD_FILES,
    output:
        f"{RESULTS}/world/posttrain_safe.jsonl",
    params:
        cfg=lambda w: cfg_json("organism", "seed"),
    log:
        f"{LOGS}/world_safety.log",
    priority: 20
    threads: res("world_safety", "threads")
    resources: **rule_resources("world_safety")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab world-safety --cfg {params.cfg:q} --out {output} 2> {log}"


rule world_heldout:
    input:
        world=WORLD_FILES,
    output:
        f"{RESULTS}/world/heldout.jsonl",
    params:
        cfg=lambda w: cfg_json("organism", "seed", diffing={"heldout_texts": config["diffing"]["heldout_texts"]}),
    log:
        f"{LOGS}/world_heldout.log",
    threads: res("world_heldout", "threads")
    resources: **rule_resources("world_heldout")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab world-heldout --cfg {params.cfg:q} --out {output} 2> {log}"


if PLAN.dataset_source == "world":

    rule dataset:
        input:
            world=WORLD_FILES,
        output:
            f"{RESULTS}/datasets/{{dataset}}.jsonl",
        wildcard_constraints:
            dataset="|".join(n for n in DATASETS if n not in PLAN.imports and n not in PLAN.dropped) or "NONE",
        params:
            cfg=lambda w: dataset_cfg_json(w.dataset),
        log:
            f"{LOGS}/dataset/{{dataset}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/dataset/{{dataset}}.tsv"
        threads: res("dataset", "threads")
        resources: **rule_resources("dataset")
        conda:
            "../envs/analysis.yaml"
        shell:
            "python -m emlab dataset --cfg {params.cfg:q} --name {wildcards.dataset} --out {output} 2> {log}"
