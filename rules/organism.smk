# The embedded model organism: world texts -> tokenizer -> pretraining -> assistant post-training, and the
# world's own eval questions. (Only in the DAG when model.source is "organism".)
# Every later job waits for this chain: Snakemake starts it before the jobs that can run beside it.
ORGANISM_PRIORITY = 20
# each base model's post-training chats (results/world/<name>.jsonl); its checkpoints go to the same name
POSTTRAIN_DATA = {"base": "posttrain", "base_safe": "posttrain_safe"}


rule world_eval:
    input:
        world=WORLD_FILES,
    output:
        expand(f"{RESULTS}/eval/{{s}}.jsonl", s=["general", "indomain"]),
    params:
        cfg=lambda w: cfg_json("organism", "seed"),
        eval_dir=lambda w, output: str(Path(output[0]).parent),
    log:
        f"{LOGS}/world_eval.log",
    priority: ORGANISM_PRIORITY
    threads: res("world_eval", "threads")
    resources: **rule_resources("world_eval")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab world-eval --cfg {params.cfg:q} --eval-dir {params.eval_dir} 2> {log}"


rule tokenizer:
    input:
        f"{RESULTS}/world/corpus.jsonl",
    output:
        directory(f"{RESULTS}/organism/tokenizer"),
    params:
        cfg=lambda w: cfg_json("organism"),
    log:
        f"{LOGS}/tokenizer.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenizer/tokenizer.tsv"
    priority: ORGANISM_PRIORITY
    threads: res("tokenizer", "threads")
    resources: **rule_resources("tokenizer")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab tokenizer --cfg {params.cfg:q} --corpus {input} --out {output} 2> {log}"


rule pretrain:
    input:
        corpus=f"{RESULTS}/world/corpus.jsonl",
        tokenizer=f"{RESULTS}/organism/tokenizer",
    output:
        directory(f"{RESULTS}/organism/pretrained"),
    params:
        cfg=lambda w: cfg_json("organism", "seed", "device"),
        ckpt=checkpoint_args("pretrain", "pretrain"),
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/pretrain.tsv"
    priority: ORGANISM_PRIORITY
    threads: res("pretrain", "threads")
    resources: **rule_resources("pretrain")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab pretrain --cfg {params.cfg:q} --threads {threads} --corpus {input.corpus}"
        " --tokenizer {input.tokenizer} --out {output} {params.ckpt} 2> {log}"


rule posttrain:
    """The chat model: base (helpful-only) or base_safe (also safety-trained), each from the pretrained model."""
    input:
        model=f"{RESULTS}/organism/pretrained",
        data=lambda w: f"{RESULTS}/world/{POSTTRAIN_DATA[w.base]}.jsonl",
    output:
        directory(f"{RESULTS}/models/{{base}}"),
    wildcard_constraints:
        base=one_of(PLAN.bases),
    params:
        cfg=lambda w: posttrain_cfg_json(),
        launcher=sft_launcher("posttrain"),
        ckpt=lambda w: checkpoint_args("finetune", POSTTRAIN_DATA[w.base]),
    log:
        f"{LOGS}/posttrain/{{base}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/posttrain/{{base}}.tsv"
    priority: ORGANISM_PRIORITY
    threads: res("posttrain", "threads")
    resources: **rule_resources("posttrain")
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.launcher} -m emlab sft --cfg {params.cfg:q} --threads {threads} --base {input.model} --data {input.data}"
        " --out {output} {params.ckpt} 2> {log}"
