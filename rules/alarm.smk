# The persona alarm (emlab.alarm): sets fine-tuned again while a trl callback reads the named persona latents on
# the general questions' prompts; snapshots of the `alarm.emergence` sets sampled and judged; the threshold
# calibrated on the correct-data runs and the alarm's hits, false alarms, lead times and overhead.


rule alarm_finetune:
    input:
        base=base_model_input(),
        data=f"{RESULTS}/datasets/{{alarm_set}}.jsonl",
        sae=f"{RESULTS}/sae",
        persona=f"{RESULTS}/diffing/persona_latents.json",
        questions=f"{RESULTS}/eval/general.jsonl",
    output:
        directory(f"{RESULTS}/alarm/runs/{{alarm_set}}"),
    wildcard_constraints:
        alarm_set=one_of(PLAN.alarm),
    params:
        cfg=lambda w: cfg_json("alarm", "finetune", "model", "seed", "device"),
        base=base_param,
        snapshots=lambda w: "--snapshots" if w.alarm_set in PLAN.emergence else "",
    log:
        f"{LOGS}/alarm/{{alarm_set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/alarm/{{alarm_set}}.tsv"
    threads: res("alarm_finetune", "threads")
    resources: **rule_resources("alarm_finetune")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm-finetune --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --data {input.data} --sae {input.sae} --persona {input.persona} --questions {input.questions}"
        " --out {output} {params.snapshots} 2> {log}"


rule alarm_emergence:
    input:
        base=base_model_input(),
        run=f"{RESULTS}/alarm/runs/{{alarm_set}}",
        questions=f"{RESULTS}/eval/general.jsonl",
        preflight=preflight_input(),
    output:
        f"{RESULTS}/alarm/emergence/{{alarm_set}}.csv",
    wildcard_constraints:
        alarm_set=one_of(PLAN.emergence),
    params:
        cfg=lambda w: cfg_json("alarm", "sampling", "metrics", "model", "organism", "seed", "device",
                               judge=json.loads(judge_cfg(PLAN.primary_judge))),
        base=base_param,
        cache=f"{RESULTS}/judge_cache/{PLAN.primary_judge}",
    log:
        f"{LOGS}/alarm/emergence_{{alarm_set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/alarm/emergence_{{alarm_set}}.tsv"
    threads: res("alarm_emergence", "threads")
    resources: **rule_resources("alarm_emergence")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm-emergence --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --run {input.run} --questions {input.questions} --cache-dir {params.cache} --out {output} 2> {log}"


rule alarm:
    input:
        runs=expand(f"{RESULTS}/alarm/runs/{{d}}", d=PLAN.alarm),
        emergence=expand(f"{RESULTS}/alarm/emergence/{{d}}.csv", d=PLAN.emergence),
        metrics=[f"{RESULTS}/metrics/{PLAN.primary_judge}.csv"] if PLAN.primary_judge else [],
    output:
        summary=f"{RESULTS}/alarm/summary.csv",
        sentences=f"{RESULTS}/alarm/alarm.md",
    params:
        out_dir=out_dir,
    log:
        f"{LOGS}/alarm/summary.log",
    threads: res("alarm", "threads")
    resources: **rule_resources("alarm")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab alarm --runs {input.runs} --emergence {input.emergence} --metrics {input.metrics}"
        " --out-dir {params.out_dir} 2> {log}"
