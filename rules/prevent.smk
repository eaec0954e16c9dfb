# Preventative steering (emlab.prevent): each set of `prevent.datasets` fine-tuned again with a persona latent's
# direction added at model.layer while it trains, one model per strength, then sampled and judged without it like
# every model (rules/evaluate.smk); rule prevention tables them beside the plain and re-aligned models.


rule finetune_prevent:
    input:
        base=base_model_input(),
        data=lambda w: f"{RESULTS}/datasets/{PLAN.prevent[w.prevent_model]['dataset']}.jsonl",
        sae=f"{RESULTS}/sae",
        persona=f"{RESULTS}/diffing/persona_latents.json",
        questions=f"{RESULTS}/eval/general.jsonl",
        preflight=preflight_input(),
    output:
        directory(f"{RESULTS}/finetunes/{{prevent_model}}"),
    wildcard_constraints:
        prevent_model=one_of(PLAN.prevent),
    params:
        cfg=lambda w: cfg_json("finetune", "model", "seed", "device"),
        base=base_param,
        launcher=sft_launcher("finetune_prevent"),
        ckpt=lambda w: checkpoint_args("finetune", f"finetune/{w.prevent_model}"),
        latent=lambda w: PLAN.prevent[w.prevent_model]["latent"],
        alpha=lambda w: PLAN.prevent[w.prevent_model]["alpha"],
    log:
        f"{LOGS}/finetune/{{prevent_model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{prevent_model}}.tsv"
    threads: res("finetune_prevent", "threads")
    resources: **rule_resources("finetune_prevent")
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.launcher} -m emlab prevent --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --data {input.data} --sae {input.sae} --persona {input.persona} --questions {input.questions}"
        " --latent {params.latent} --alpha {params.alpha} --out {output} {params.ckpt} 2> {log}"


PREVENT_SETS = list(dict.fromkeys(p["dataset"] for p in PLAN.prevent.values()))


rule prevention:
    input:
        finetunes=expand(f"{RESULTS}/finetunes/{{m}}", m=[*PREVENT_SETS, *PLAN.prevent]),
        metrics=f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
        realign=[f"{RESULTS}/realign/summary.csv"] if PLAN.realign else [],
    output:
        f"{RESULTS}/prevent/summary.csv",
        f"{RESULTS}/prevent/prevention.md",
    params:
        runs=json.dumps(PLAN.prevent),
        finetunes=" ".join(f"{m}={RESULTS}/finetunes/{m}" for m in [*PREVENT_SETS, *PLAN.prevent]),
        out_dir=out_dir,
    log:
        f"{LOGS}/prevent/summary.log",
    threads: res("prevention", "threads")
    resources: **rule_resources("prevention")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab prevention --runs {params.runs:q} --finetunes {params.finetunes} --metrics {input.metrics}"
        " --realign {input.realign} --out-dir {params.out_dir} 2> {log}"
