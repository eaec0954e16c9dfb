# Activation monitors: zero-shot asking, raw-activation, prompted and SAE probes, the persona latent used
# directly; AUROC in and out of distribution against training size, on labelled texts per task.
# (In the DAG when monitors are enabled: see `monitors.enabled` in the config schema.)

wildcard_constraints:
    task="|".join(MON_TASKS) or "NONE",


if not PLAN.monitor_data:  # the world's labelled tasks

    rule monitor_data:
        output:
            f"{RESULTS}/monitors/data/{{task}}.jsonl",
        params:
            cfg=lambda w: cfg_json("organism", "monitors", "seed"),
        log:
            f"{LOGS}/monitors/data_{{task}}.log",
        threads: res("monitor_data", "threads")
        resources: **rule_resources("monitor_data")
        conda:
            "../envs/analysis.yaml"
        shell:
            "python -m emlab monitor-data --cfg {params.cfg:q} --task {wildcards.task} --out {output} 2> {log}"


rule monitor:
    input:
        base=base_model_input(),
        data=lambda w: monitor_data(w.task),
        sae=[f"{RESULTS}/sae"] if DIFFING else [],
        latents=[f"{RESULTS}/diffing/persona_latents.json"] if DIFFING else [],
    output:
        results=f"{RESULTS}/monitors/{{task}}.csv",
        features=directory(f"{RESULTS}/monitors/features/{{task}}"),
    params:
        cfg=lambda w: cfg_json("model", "organism", "monitors", "seed", "device"),
        base=base_param,
        sae=lambda w, input: f"--sae {input.sae}" if input.sae else "",
        latents=lambda w, input: f"--latents {input.latents}" if input.latents else "",
    log:
        f"{LOGS}/monitors/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/monitor/{{task}}.tsv"
    threads: res("monitor", "threads")
    resources: **rule_resources("monitor")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab monitor --cfg {params.cfg:q} --threads {threads} --task {wildcards.task} --data {input.data}"
        " --base {params.base} {params.sae} {params.latents} --features {output.features} --out {output.results} 2> {log}"


rule plot_monitors:
    input:
        expand(f"{RESULTS}/monitors/{{task}}.csv", task=MON_TASKS),
    output:
        summary=f"{RESULTS}/monitors/summary.csv",
        figures=report(expand(f"{RESULTS}/figures/monitors_{{task}}.png", task=MON_TASKS),
                       caption="../workflow/report/monitors.rst", category="Monitors"),
    params:
        out_dir=lambda w, output: os.path.dirname(output.figures[0]),
    log:
        f"{LOGS}/plot/monitors.log",
    threads: res("plot_monitors", "threads")
    resources: **rule_resources("plot_monitors")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab monitor-plot --results {input} --out-dir {params.out_dir} --summary {output.summary} 2> {log}"
