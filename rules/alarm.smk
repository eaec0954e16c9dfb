# The persona alarm (emlab.alarm): the fine-tunes of `alarm.datasets` keep a snapshot every `alarm.every` steps
# (rules/finetune.smk); each snapshot is read as the trl callback would have read it during training, those of the
# `alarm.emergence` sets are also sampled and judged, and the threshold is calibrated on the correct-data runs.


rule alarm_replay:
    input:
        base=base_model_input(),
        finetunes=expand(f"{RESULTS}/finetunes/{{d}}", d=PLAN.alarm),
        sae=f"{RESULTS}/sae",
        persona=f"{RESULTS}/diffing/persona_latents.json",
        questions=f"{RESULTS}/eval/general.jsonl",
    output:
        trajectories=f"{RESULTS}/alarm/trajectories.csv",
        runs=f"{RESULTS}/alarm/runs.json",
    params:
        cfg=lambda w: cfg_json("alarm", "model", "device"),
        base=base_param,
        out_dir=out_dir,
    log:
        f"{LOGS}/alarm/replay.log",
    benchmark:
        f"{RESULTS}/benchmarks/alarm/replay.tsv"
    threads: res("alarm_replay", "threads")
    resources: **rule_resources("alarm_replay")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm-replay --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --finetunes {input.finetunes} --sae {input.sae} --persona {input.persona} --questions {input.questions}"
        " --out-dir {params.out_dir} 2> {log}"


rule alarm_emergence:
    input:
        base=base_model_input(),
        finetune=f"{RESULTS}/finetunes/{{alarm_set}}",
        questions=f"{RESULTS}/eval/general.jsonl",
        preflight=preflight_input(),
    output:
        f"{RESULTS}/alarm/emergence/{{alarm_set}}.csv",
    wildcard_constraints:
        alarm_set=one_of(PLAN.emergence),
    params:
        cfg=lambda w: cfg_json("sampling", "metrics", "model", "organism", "seed", "device",
                               judge=json.loads(judge_cfg(PLAN.primary_judge))),
        base=base_param,
        cache=f"{RESULTS}/judge_cache/{PLAN.primary_judge}",
        every=config["alarm"]["emergence_every"],
        n_samples=n_samples_arg(config["alarm"]["emergence_samples"]),
    log:
        f"{LOGS}/alarm/emergence_{{alarm_set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/alarm/emergence_{{alarm_set}}.tsv"
    threads: res("alarm_emergence", "threads")
    resources: **rule_resources("alarm_emergence")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab snapshot-misalignment --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --finetune {input.finetune} --questions {input.questions} --cache-dir {params.cache} --out {output}"
        " --every {params.every} {params.n_samples} 2> {log}"


rule alarm:
    input:
        trajectories=f"{RESULTS}/alarm/trajectories.csv",
        runs=f"{RESULTS}/alarm/runs.json",
        emergence=expand(f"{RESULTS}/alarm/emergence/{{d}}.csv", d=PLAN.emergence),
        metrics=[f"{RESULTS}/metrics/{PLAN.primary_judge}.csv"] if PLAN.primary_judge else [],
    output:
        summary=f"{RESULTS}/alarm/summary.csv",
        sentences=f"{RESULTS}/alarm/alarm.md",
    params:
        cfg=lambda w: cfg_json("alarm"),
        out_dir=out_dir,
    log:
        f"{LOGS}/alarm/summary.log",
    threads: res("alarm", "threads")
    resources: **rule_resources("alarm")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm --cfg {params.cfg:q} --alarm-dir {params.out_dir} --emergence {input.emergence} --metrics {input.metrics}"
        " 2> {log}"
