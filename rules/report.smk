# Figures (drawn from result tables only, so they regenerate without recomputation) and stage timings.


rule plot_misalignment:
    input:
        f"{RESULTS}/metrics/{{judge}}.csv",
    output:
        report(f"{RESULTS}/figures/misalignment_{{judge}}.png", caption="../workflow/report/misalignment.rst",
               category="Emergent misalignment"),
    log:
        "logs/plot/misalignment_{judge}.log",
    threads: res("plot_misalignment", "threads")
    resources:
        mem_mb=res("plot_misalignment", "mem_mb"),
        runtime=res("plot_misalignment", "runtime"),
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot --metrics {input} --out {output} 2> {log}"


rule timings:
    input:
        expand(f"{RESULTS}/figures/misalignment_{{judge}}.png", judge=JUDGES),
    output:
        f"{RESULTS}/timings.csv",
    params:
        benchmarks=f"{RESULTS}/benchmarks",
    log:
        "logs/timings.log",
    threads: res("timings", "threads")
    resources:
        mem_mb=res("timings", "mem_mb"),
        runtime=res("timings", "runtime"),
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab timings --benchmarks {params.benchmarks} --out {output} 2> {log} && cat {log}"
