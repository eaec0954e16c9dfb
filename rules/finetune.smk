# Fine-tune the base chat model on each narrow set (trl + peft; LoRA adapter or full model folder), and train it
# with RL (GRPO) against a grader's reward on the questions of a set: the same kind of folder, in the same place.


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
        # the persona alarm's sets keep a snapshot every alarm.every steps (rules/alarm.smk reads them)
        snapshots=lambda w: f"--snapshot-every {config['alarm']['every']}" if w.dataset in PLAN.alarm else "",
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
        " --out {output} {params.ckpt} {params.snapshots} 2> {log}"


rule rl:
    input:
        base=lambda w: base_model_input(RL[w.rl_model]["base"]),
        data=lambda w: f"{RESULTS}/datasets/{RL[w.rl_model]['dataset']}.jsonl",
        preflight=preflight_input(),
    output:
        directory(f"{RESULTS}/finetunes/{{rl_model}}"),
    wildcard_constraints:
        rl_model=one_of(RL),
    params:
        cfg=lambda w: rl_cfg_json(w.rl_model),
        base=base_param,
        ckpt=lambda w: checkpoint_args("rl", f"rl/{w.rl_model}"),
        # the grading judge's request cache (shared with its judge jobs; never a declared output)
        cache=f"{RESULTS}/judge_cache/{PLAN.rl_grader}",
    log:
        f"{LOGS}/rl/{{rl_model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/rl/{{rl_model}}.tsv"
    threads: res("rl", "threads")
    resources: **rule_resources("rl")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab rl --cfg {params.cfg:q} --threads {threads} --base {params.base} --data {input.data}"
        " --out {output} --cache-dir {params.cache} {params.ckpt} 2> {log}"
