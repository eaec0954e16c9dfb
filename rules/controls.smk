# Code and the controls (emlab.controls): the code fine-tunes and the educational controls, with their plain
# counterparts and the persona latents each moves, in one table (results/controls/) and one figure.


rule controls:
    input:
        metrics=f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
        shifts=[f"{RESULTS}/prediction/shifts.csv"] if PLAN.prediction else [],
    output:
        f"{RESULTS}/controls/summary.csv",
        f"{RESULTS}/controls/controls.md",
    params:
        code=" ".join(PLAN.code_domains),
        incorrect=config["datasets"]["educational"]["incorrect"],
        out_dir=out_dir,
    log:
        f"{LOGS}/controls.log",
    threads: res("controls", "threads")
    resources: **rule_resources("controls")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab controls --metrics {input.metrics} --shifts {input.shifts} --code-domains {params.code}"
        " --incorrect {params.incorrect} --out-dir {params.out_dir} 2> {log}"


rule plot_controls:
    input:
        f"{RESULTS}/controls/summary.csv",
    output:
        report(f"{RESULTS}/figures/controls.png", caption="../workflow/report/controls.rst",
               category="Emergent misalignment"),
    log:
        f"{LOGS}/plot/controls.log",
    threads: res("plot_controls", "threads")
    resources: **rule_resources("plot_controls")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-controls --summary {input} --out {output} 2> {log}"
