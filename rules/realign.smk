# Emergent re-alignment (emlab.realign): each model of `realign.models` trained further on a benign (correct) set,
# its snapshots sampled and judged and, with model diffing, read by the persona alarm's reader.


rule realign:
    input:
        base=lambda w: base_model_input(PLAN.base_of(PLAN.realign[w.realign_run]["model"])),
        finetune=lambda w: f"{RESULTS}/finetunes/{PLAN.realign[w.realign_run]['model']}",
        data=lambda w: f"{RESULTS}/datasets/{PLAN.realign[w.realign_run]['benign']}.jsonl",
    output:
        directory(f"{RESULTS}/realign/runs/{{realign_run}}"),
    wildcard_constraints:
        realign_run=one_of(PLAN.realign),
    params:
        cfg=lambda w: cfg_json("seed", finetune=realign_finetune_settings()),
        base=base_param,
        source=realign_source_args,
        every=config["realign"]["every"],
    log:
        f"{LOGS}/realign/{{realign_run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/realign/{{realign_run}}.tsv"
    threads: res("realign", "threads")
    resources: **rule_resources("realign")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab sft --cfg {params.cfg:q} --threads {threads} {params.source} --data {input.data}"
        " --out {output} --snapshot-every {params.every} 2> {log}"


rule realign_eval:
    input:
        base=base_model_input(),
        run=f"{RESULTS}/realign/runs/{{realign_run}}",
        questions=f"{RESULTS}/eval/general.jsonl",
        indomain=[f"{RESULTS}/eval/indomain.jsonl"] if "indomain" in EVAL_SETS else [],
        preflight=preflight_input(),
    output:
        f"{RESULTS}/realign/eval/{{realign_run}}.csv",
    wildcard_constraints:
        realign_run=one_of(PLAN.realign),
    params:
        cfg=lambda w: cfg_json("sampling", "metrics", "model", "organism", "seed", "device",
                               judge=json.loads(judge_cfg(PLAN.primary_judge))),
        base=base_param,
        cache=f"{RESULTS}/judge_cache/{PLAN.primary_judge}",
        every=config["realign"]["every"],
        n_samples=n_samples_arg(config["realign"]["n_samples"]),
        indomain=realign_indomain_args,
    log:
        f"{LOGS}/realign/eval_{{realign_run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/realign/eval_{{realign_run}}.tsv"
    threads: res("realign_eval", "threads")
    resources: **rule_resources("realign_eval")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab snapshot-misalignment --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --finetune {input.run} --questions {input.questions} --cache-dir {params.cache} --out {output}"
        " --every {params.every} {params.n_samples} {params.indomain} 2> {log}"


rule realign_read:
    input:
        base=base_model_input(),
        runs=expand(f"{RESULTS}/realign/runs/{{r}}", r=PLAN.realign),
        sae=f"{RESULTS}/sae",
        persona=f"{RESULTS}/diffing/persona_latents.json",
        questions=f"{RESULTS}/eval/general.jsonl",
    output:
        trajectories=f"{RESULTS}/realign/trajectories.csv",
        runs=f"{RESULTS}/realign/runs.json",
    params:
        cfg=lambda w: cfg_json("alarm", "model", "device"),
        base=base_param,
        out_dir=out_dir,
    log:
        f"{LOGS}/realign/read.log",
    threads: res("realign_read", "threads")
    resources: **rule_resources("realign_read")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm-replay --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --finetunes {input.runs} --sae {input.sae} --persona {input.persona} --questions {input.questions}"
        " --out-dir {params.out_dir} 2> {log}"


rule realignment:
    input:
        evals=expand(f"{RESULTS}/realign/eval/{{r}}.csv", r=PLAN.realign),
        metrics=f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
        trajectories=[f"{RESULTS}/realign/trajectories.csv"] if DIFFING else [],
    output:
        curve=f"{RESULTS}/realign/curve.csv",
        summary=f"{RESULTS}/realign/summary.csv",
    params:
        cfg=lambda w: cfg_json("realign"),
        runs=json.dumps(PLAN.realign),
        out_dir=out_dir,
    log:
        f"{LOGS}/realign/summary.log",
    threads: res("realignment", "threads")
    resources: **rule_resources("realignment")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab realignment --cfg {params.cfg:q} --runs {params.runs:q} --evals {input.evals}"
        " --metrics {input.metrics} --trajectories {input.trajectories} --out-dir {params.out_dir} 2> {log}"
