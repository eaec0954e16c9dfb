# Steering: add SAE latent directions to the base model and subtract them from the fine-tunes (the screen),
# then sweep strengths for the kept latents, the mean-difference direction and a random control, each steered
# answer graded by the steering judge. A run without a judge (a hub model read by the likelihood probe) sweeps
# the candidates through the probe instead: how much more likely the steered model finds misaligned answers.
# (In the DAG when steering is enabled: see `steer.enabled` in the config schema.)


rule steer_directions:
    input:
        base=base_model_input(),
        sae=f"{RESULTS}/sae",
        ranking=f"{RESULTS}/diffing/ranking.csv",
        caches=expand(f"{RESULTS}/activations/eval/{{m}}", m=["base"] + STEER_GROUP_MODELS) if STEER_JUDGE else [],
        grades=expand(f"{RESULTS}/grades/{STEER_JUDGE}/{{m}}.jsonl", m=["base"] + STEER_GROUP_MODELS)
        if STEER_JUDGE else [],
        questions=[] if STEER_JUDGE else [f"{RESULTS}/eval/general.jsonl"],
    output:
        directions=f"{STEER_DIR}/directions.safetensors",
        info=f"{STEER_DIR}/directions.json",
    params:
        cfg=lambda w: cfg_json("model", "steer", "metrics", "probe", "organism", "seed", "device"),
        # without a judge the mean difference comes from the probe's reference answers, read by the base model
        by_probe=lambda w, input: "" if STEER_JUDGE else f"{model_args('base')} --questions {input.questions}",
        caches=lambda w, input: f"--caches {input.caches} --grades {input.grades}" if STEER_JUDGE else "",
    log:
        f"{LOGS}/steering/directions.log",
    priority: STEER_PRIORITY
    threads: res("steer_directions", "threads")
    resources: **rule_resources("steer_directions")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab steer-directions --cfg {params.cfg:q} --sae {input.sae} --ranking {input.ranking}"
        " {params.caches} {params.by_probe} --out {output.directions} --out-json {output.info} 2> {log}"


if STEER_JUDGE:

    rule steer_sample:
        input:
            lambda w: model_input(w.target),
            directions=f"{STEER_DIR}/directions.safetensors",
            info=f"{STEER_DIR}/directions.json",
            questions=expand(f"{RESULTS}/eval/{{s}}.jsonl", s=STEER["eval_sets"]),
            add_grades=lambda w: steer_grades("screen_add") if w.stage == "screen_sub" else [],
            screen=lambda w: [f"{STEER_DIR}/screen.json"] if w.stage == "sweep" else [],
        output:
            f"{STEER_DIR}/samples/{{stage}}/{{target}}.jsonl",
        wildcard_constraints:
            stage="screen_add|screen_sub|sweep",
            target="|".join(MODELS),
        params:
            cfg=lambda w: cfg_json("model", "steer", "sampling", "metrics", "seed", "device"),
            model=lambda w: model_args(w.target),
            add_grades=lambda w, input: f"--screen-add-grades {' '.join(input.add_grades)}" if input.add_grades else "",
            screen=lambda w, input: f"--screen {input.screen}" if input.screen else "",
        log:
            f"{LOGS}/steering/{{stage}}/{{target}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/steer_sample/{{stage}}-{{target}}.tsv"
        priority: STEER_PRIORITY
        threads: res("steer_sample", "threads")
        resources: **rule_resources("steer_sample")
        conda:
            "../envs/torch.yaml"
        shell:
            "python -m emlab steer-sample --cfg {params.cfg:q} --threads {threads} --stage {wildcards.stage}"
            " --target {wildcards.target} {params.model} --directions {input.directions} --directions-json {input.info}"
            " --questions {input.questions} {params.add_grades} {params.screen} --out {output} 2> {log}"


    rule judge_steering:
        input:
            samples=f"{STEER_DIR}/samples/{{stage}}/{{target}}.jsonl",
            world=judge_world_files,
        output:
            grades=f"{STEER_DIR}/grades/{{judge}}/{{stage}}/{{target}}.jsonl",
            summary=f"{STEER_DIR}/grades/{{judge}}/{{stage}}/{{target}}.summary.json",
        wildcard_constraints:
            stage="screen_add|screen_sub|sweep",
            target="|".join(MODELS),
        params:
            cfg=lambda w: judge_cfg(w.judge),
            cache=lambda w: f"{RESULTS}/judge_cache/{w.judge}",
        log:
            f"{LOGS}/steering/judge/{{judge}}/{{stage}}/{{target}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/judge_steering/{{judge}}-{{stage}}-{{target}}.tsv"
        priority: STEER_PRIORITY
        threads: res("judge_steering", "threads")
        resources: **judge_job_resources("judge_steering")
        conda:
            "../envs/torch.yaml"
        shell:
            "python -m emlab judge --cfg {params.cfg:q} --samples {input.samples} --out {output.grades}"
            " --cache-dir {params.cache} 2> {log}"


    rule steer_screen:
        input:
            info=f"{STEER_DIR}/directions.json",
            add=steer_grades("screen_add"),
            sub=steer_grades("screen_sub"),
        output:
            table=f"{STEER_DIR}/screen.csv",
            info=f"{STEER_DIR}/screen.json",
        params:
            cfg=lambda w: cfg_json("steer", "metrics", "seed"),
            targets=" ".join(SCREEN_TARGETS),
        log:
            f"{LOGS}/steering/screen.log",
        priority: STEER_PRIORITY
        threads: res("steer_screen", "threads")
        resources: **rule_resources("steer_screen")
        conda:
            "../envs/analysis.yaml"
        shell:
            "python -m emlab steer-screen --cfg {params.cfg:q} --directions-json {input.info} --add-grades {input.add}"
            " --sub-grades {input.sub} --targets {params.targets} --out {output.table} --out-json {output.info} 2> {log}"


    rule steer_sweep:
        input:
            info=f"{STEER_DIR}/directions.json",
            screen=f"{STEER_DIR}/screen.json",
            grades=steer_grades("sweep"),
        output:
            table=f"{STEER_DIR}/sweep.csv",
            figure=report(f"{RESULTS}/figures/steering_sweep.png", caption="../workflow/report/steering.rst",
                          category="Steering"),
        params:
            cfg=lambda w: cfg_json("model", "steer", "metrics", "seed"),
        log:
            f"{LOGS}/steering/sweep.log",
        priority: STEER_PRIORITY
        threads: res("steer_sweep", "threads")
        resources: **rule_resources("steer_sweep")
        conda:
            "../envs/analysis.yaml"
        shell:
            "python -m emlab steer-sweep --cfg {params.cfg:q} --directions-json {input.info} --screen {input.screen}"
            " --grades {input.grades} --out {output.table} --figure {output.figure} 2> {log}"


else:

    rule steer_probe:
        input:
            lambda w: model_input(w.target),
            directions=f"{STEER_DIR}/directions.safetensors",
            info=f"{STEER_DIR}/directions.json",
            questions=f"{RESULTS}/eval/general.jsonl",
        output:
            f"{STEER_DIR}/probe/{{target}}.jsonl",
        wildcard_constraints:
            target="|".join(MODELS),
        params:
            cfg=lambda w: cfg_json("model", "steer", "probe", "organism", "seed", "device"),
            model=lambda w: model_args(w.target),
        log:
            f"{LOGS}/steering/probe/{{target}}.log",
        priority: STEER_PRIORITY
        threads: res("steer_probe", "threads")
        resources: **rule_resources("steer_probe")
        conda:
            "../envs/torch.yaml"
        shell:
            "python -m emlab steer-probe --cfg {params.cfg:q} --threads {threads} --target {wildcards.target}"
            " {params.model} --directions {input.directions} --directions-json {input.info}"
            " --questions {input.questions} --out {output} 2> {log}"

    rule steer_probe_sweep:
        input:
            expand(f"{STEER_DIR}/probe/{{t}}.jsonl", t=SWEEP_TARGETS),
        output:
            table=f"{STEER_DIR}/probe_sweep.csv",
            figure=report(f"{RESULTS}/figures/steering_probe.png", caption="../workflow/report/steering_probe.rst",
                          category="Steering"),
        params:
            cfg=lambda w: cfg_json("model", "steer", "metrics", "seed"),
        log:
            f"{LOGS}/steering/probe_sweep.log",
        threads: res("steer_probe_sweep", "threads")
        resources: **rule_resources("steer_probe_sweep")
        conda:
            "../envs/analysis.yaml"
        shell:
            "python -m emlab steer-probe-sweep --cfg {params.cfg:q} --rows {input} --out {output.table}"
            " --figure {output.figure} 2> {log}"
