# Figures (drawn from result tables only, so they regenerate without recomputation) and stage timings.


rule plot_misalignment:
    input:
        f"{RESULTS}/metrics/{{judge}}.csv",
    output:
        report(f"{RESULTS}/figures/misalignment_{{judge}}.png", caption="../workflow/report/misalignment.rst",
               category="Emergent misalignment"),
    log:
        f"{LOGS}/plot/misalignment_{{judge}}.log",
    threads: res("plot_misalignment", "threads")
    resources: **rule_resources("plot_misalignment")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot --metrics {input} --out {output} 2> {log}"



rule plot_mixtures:
    input:
        f"{RESULTS}/mixtures/curve.csv",
    output:
        report(f"{RESULTS}/figures/mixtures.png", caption="../workflow/report/mixtures.rst",
               category="Emergent misalignment"),
    log:
        f"{LOGS}/plot/mixtures.log",
    threads: res("plot_mixtures", "threads")
    resources: **rule_resources("plot_mixtures")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-mixtures --curve {input} --out {output} 2> {log}"


rule plot_rl:
    input:
        expand(f"{RESULTS}/finetunes/{{m}}", m=RL),
    output:
        report(f"{RESULTS}/figures/rl_training.png", caption="../workflow/report/rl.rst", category="RL"),
    log:
        f"{LOGS}/plot/rl_training.log",
    threads: res("plot_rl", "threads")
    resources: **rule_resources("plot_rl")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-rl --models {input} --out {output} 2> {log}"

rule agreement:
    input:
        expand(f"{RESULTS}/grades/{{judge}}/{{model}}.jsonl", judge=JUDGES, model=MODELS),
    output:
        rates=f"{RESULTS}/agreement/rates.csv",
        pairs=f"{RESULTS}/agreement/pairs.csv",
        figure=report(f"{RESULTS}/figures/judge_agreement.png", caption="../workflow/report/agreement.rst",
                      category="Judges"),
    params:
        cfg=lambda w: cfg_json("metrics"),
    log:
        f"{LOGS}/agreement.log",
    threads: res("agreement", "threads")
    resources: **rule_resources("agreement")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab agreement --cfg {params.cfg:q} --grades {input} --rates {output.rates}"
        " --pairs {output.pairs} --figure {output.figure} 2> {log}"


rule timings:
    input:
        # every other final output, so that the table covers every stage of the run
        [f for f in final_outputs() if not f.endswith("timings.csv")],
    output:
        f"{RESULTS}/timings.csv",
    params:
        logs=LOGS,
    log:
        f"{LOGS}/timings.log",
    threads: res("timings", "threads")
    resources: **rule_resources("timings")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab timings --logs {params.logs} --out {output} 2> {log} && cat {log}"


rule plot_alarm:
    input:
        trajectories=f"{RESULTS}/alarm/trajectories.csv",
        emergence=expand(f"{RESULTS}/alarm/emergence/{{d}}.csv", d=PLAN.emergence),
        summary=f"{RESULTS}/alarm/summary.csv",
    output:
        report(f"{RESULTS}/figures/alarm.png", caption="../workflow/report/alarm.rst", category="Model diffing"),
    log:
        f"{LOGS}/plot/alarm.log",
    threads: res("plot_alarm", "threads")
    resources: **rule_resources("plot_alarm")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab plot-alarm --trajectories {input.trajectories} --emergence {input.emergence}"
        " --summary {input.summary} --out {output} 2> {log}"


rule plot_realignment:
    input:
        f"{RESULTS}/realign/curve.csv",
    output:
        report(f"{RESULTS}/figures/realignment.png", caption="../workflow/report/realignment.rst",
               category="Emergent misalignment"),
    log:
        f"{LOGS}/plot/realignment.log",
    threads: res("plot_realignment", "threads")
    resources: **rule_resources("plot_realignment")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-realignment --curve {input} --out {output} 2> {log}"


rule plot_prevention:
    input:
        f"{RESULTS}/prevent/summary.csv",
    output:
        report(f"{RESULTS}/figures/prevention.png", caption="../workflow/report/prevention.rst",
               category="Emergent misalignment"),
    log:
        f"{LOGS}/plot/prevention.log",
    threads: res("plot_prevention", "threads")
    resources: **rule_resources("plot_prevention")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-prevention --summary {input} --out {output} 2> {log}"
