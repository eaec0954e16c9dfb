# Narrow fine-tuning sets and correct/incorrect mixtures (chat JSONL with ground-truth labels in `meta`).


rule dataset:
    output:
        f"{RESULTS}/datasets/{{dataset}}.jsonl",
    params:
        cfg=lambda w: cfg_json("organism", "datasets", "seed"),
    log:
        "logs/dataset/{dataset}.log",
    benchmark:
        f"{RESULTS}/benchmarks/dataset/{{dataset}}.tsv"
    threads: res("dataset", "threads")
    resources:
        mem_mb=res("dataset", "mem_mb"),
        runtime=res("dataset", "runtime"),
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab dataset --cfg {params.cfg:q} --name {wildcards.dataset} --out {output} 2> {log}"
