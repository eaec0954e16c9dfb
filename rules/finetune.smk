# Fine-tune the base chat model on each narrow set (trl + peft; LoRA adapter or full model folder).


rule finetune:
    input:
        base=base_model_input(),
        data=f"{RESULTS}/datasets/{{dataset}}.jsonl",
        preflight=preflight_input(),
    output:
        directory(f"{RESULTS}/finetunes/{{dataset}}"),
    params:
        cfg=lambda w: cfg_json("finetune", "seed"),
        base=base_param,
        launcher=sft_launcher("finetune"),
        ckpt=lambda w: checkpoint_args("finetune", f"finetune/{w.dataset}"),
    log:
        f"{LOGS}/finetune/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{dataset}}.tsv"
    threads: res("finetune", "threads")
    resources: **rule_resources("finetune")
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.launcher} -m emlab sft --cfg {params.cfg:q} --threads {threads} --base {params.base} --data {input.data}"
        " --out {output} {params.ckpt} 2> {log}"
