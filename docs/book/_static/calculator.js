// The memory calculator: docs/book/calculator.py in JavaScript, function for function (tests/test_book.py compares
// the two in a browser). The constants are not written here: tools/build_book.py reads them from dit_core and writes
// calculator_constants.js, which defines DIT_CALCULATOR = {constants, presets} before this file runs.
(function () {
  "use strict";
  const STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "fsdp"];
  const COMPONENTS = ["parameters", "gradients", "optimizer", "ema", "autocast_copies", "activations"];
  const LABELS = {ddp: "DDP", zero1: "ZeRO-1", zero2: "ZeRO-2", zero3: "ZeRO-3", fsdp: "FSDP",
                  parameters: "parameters", gradients: "gradients", optimizer: "optimizer", ema: "EMA",
                  autocast_copies: "bf16 copies", activations: "activations"};
  const INTS = ["hidden", "depth", "heads", "image_size", "patch", "in_channels", "num_classes", "micro_batch",
                "dp", "tp", "pp", "cp"];

  function ditParams(m, c) {
    const h = m.hidden, p = m.patch, ch = m.in_channels;
    const mlp = Math.trunc(h * m.mlp_ratio);
    const out = p * p * ch * (m.learn_sigma ? 2 : 1);
    const embed = ch * p * p * h + h + c.TIMESTEP_FREQ_DIM * h + h + h * h + h + (m.num_classes + 1) * h;
    const block = (3 * h * h + 3 * h) + (h * h + h) + (h * mlp + mlp) + (mlp * h + h) + (6 * h * h + 6 * h);
    const fin = h * out + out + 2 * h * h + 2 * h;
    return embed + m.depth * block + fin;
  }

  function tokens(m) {
    return Math.pow(Math.floor(m.image_size / m.patch), 2);
  }

  function problems(m) {
    const out = [];
    for (const k of INTS) {
      if (!(Number.isInteger(m[k]) && m[k] >= 1)) out.push(`${k} must be a whole number of at least 1.`);
    }
    if (out.length) return out;
    if (m.hidden % m.heads) out.push(`hidden ${m.hidden} is not divisible by heads ${m.heads}.`);
    if (m.image_size % m.patch) out.push(`image size ${m.image_size} is not divisible by patch ${m.patch}.`);
    if (m.heads % m.tp) out.push(`TP ${m.tp} must divide the heads (${m.heads}): each rank keeps whole heads.`);
    if (m.depth % m.pp) out.push(`PP ${m.pp} must divide the depth (${m.depth}): each stage keeps whole blocks.`);
    if (tokens(m) % m.cp) {
      out.push(`CP ${m.cp} must divide the tokens (${tokens(m)}): each rank keeps a slice of them.`);
    }
    return out;
  }

  function memory(m, c) {
    const psi = ditParams(m, c);
    const share = psi / (m.tp * m.pp);
    const dp = m.dp;
    const compiled = m.precision === "bf16c";
    const prec = compiled ? "bf16" : m.precision;
    const fp32 = c.ZERO_STATE_BYTES.fp32;
    const scale = c.STATE_BYTES / (fp32.parameters + fp32.gradients + fp32.optimizer);
    const depth = m.depth, blocks = m.recompute_blocks;
    const recomputed = m.recompute !== "full" ? 0 : (blocks === 0 || blocks >= depth ? depth : blocks);
    const perBlock = tokens(m) * m.hidden * m.micro_batch / (m.tp * m.cp);
    const act = compiled ? c.ACT_BYTES_COMPILED_GPU : c.ACT_BYTES[prec];
    const kept = perBlock * (act * (depth - recomputed) + c.ELEMENT_BYTES[prec] * recomputed);
    const working = recomputed ? perBlock * act : 0.0;
    const activations = kept + working;
    const copies = c.AUTOCAST_COPY_BYTES * share * (1 - recomputed / depth);
    const ema = m.ema ? c.EMA_BYTES * share : 0.0;
    const result = {};
    for (const s of STRATEGIES) {
      let r;
      if (s === "ddp" || s === "fsdp") {
        const part = s === "fsdp" ? dp : 1;
        r = {};
        for (const k of ["parameters", "gradients", "optimizer"]) r[k] = fp32[k] * scale * share / part;
        r.ema = ema / part;
        r.autocast_copies = s === "ddp" && prec !== "fp32" ? copies : 0.0;
      } else {
        const stage = Number(s[s.length - 1]);
        const w = c.ZERO_STATE_BYTES[prec];
        r = {parameters: w.parameters * share / (stage >= 3 ? dp : 1),
             gradients: w.gradients * share / (stage >= 2 ? dp : 1),
             optimizer: w.optimizer * share / dp,
             ema: ema / (stage >= 3 ? dp : 1), autocast_copies: 0.0};
      }
      r.activations = activations;
      let total = 0;
      for (const k of COMPONENTS) total += r[k];
      r.total = total;
      if (s === "ddp" || s === "fsdp") {
        r.peak = r.total - r.gradients - activations + Math.max(kept, r.gradients) + working;
      }
      result[s] = r;
    }
    return result;
  }

  // ------------------------------------------------------------------ the page

  const $ = (id) => document.getElementById("calc-" + id);

  function readForm() {
    const m = {};
    for (const k of INTS.concat(["recompute_blocks"])) m[k] = Number($(k).value);
    m.mlp_ratio = Number($("mlp_ratio").value);
    m.learn_sigma = $("learn_sigma").checked;
    m.ema = $("ema").checked;
    m.precision = $("precision").value;
    m.recompute = $("recompute").value;
    return m;
  }

  function fillForm(preset) {
    for (const [k, v] of Object.entries(preset)) {
      const el = $(k);
      if (!el) continue;
      if (el.type === "checkbox") el.checked = Boolean(v); else el.value = v;
    }
  }

  const gib = (b, c) => (b / c.GIB).toFixed(2);

  function render() {
    const data = window.DIT_CALCULATOR, c = data.constants, m = readForm();
    const out = $("out"), errs = problems(m);
    if (!Number.isInteger(m.recompute_blocks) || m.recompute_blocks < 0) {
      errs.push("recomputed blocks must be a whole number, 0 meaning all of them.");
    }
    if (errs.length) {
      out.innerHTML = "";
      const p = document.createElement("p");
      p.className = "calc-problem";
      p.textContent = errs.join(" ");
      out.appendChild(p);
      return;
    }
    const r = memory(m, c), budget = Number($("gpu_gib").value) * c.GIB * c.BUDGET;
    const gpus = m.dp * m.tp * m.pp * m.cp;
    const psi = ditParams(m, c);
    let html = `<p id="calc-summary"><span id="calc-params" data-value="${psi}">` +
      `${psi.toLocaleString("en-US")}</span> parameters, ${tokens(m)} tokens per sample, ` +
      `${gpus} GPU${gpus === 1 ? "" : "s"} (DP ${m.dp} x TP ${m.tp} x PP ${m.pp} x CP ${m.cp}); GiB per GPU, ` +
      `budget ${(budget / c.GIB).toFixed(1)} GiB (${c.BUDGET * 100}% of the GPU, as the planner leaves).</p>`;
    html += "<table class='calc-table'><thead><tr><th>strategy</th>";
    for (const k of COMPONENTS) html += `<th>${LABELS[k]}</th>`;
    html += "<th>total</th><th>peak of one step</th><th>fits</th><th class='calc-bar-col'></th></tr></thead><tbody>";
    const most = Math.max(...STRATEGIES.map((s) => r[s].total), budget);
    for (const s of STRATEGIES) {
      html += `<tr data-strategy="${s}"><th>${LABELS[s]}</th>`;
      for (const k of COMPONENTS.concat(["total", "peak"])) {
        html += k in r[s] ? `<td data-component="${k}" data-bytes="${r[s][k]}">${gib(r[s][k], c)}</td>`
                          : "<td title='not modelled for DeepSpeed'>-</td>";
      }
      html += `<td>${r[s].total <= budget ? "yes" : "no"}</td><td class="calc-bar-col"><div class="calc-bar">`;
      for (const k of COMPONENTS) {
        const w = (100 * r[s][k] / most).toFixed(3);
        html += `<span class="calc-${k}" style="width:${w}%" title="${LABELS[k]} ${gib(r[s][k], c)} GiB"></span>`;
      }
      html += `<span class="calc-budget" style="left:${(100 * budget / most).toFixed(3)}%"></span></div></td></tr>`;
    }
    html += "</tbody></table><p class='calc-legend'>";
    for (const k of COMPONENTS) html += `<span class="calc-key calc-${k}"></span> ${LABELS[k]} `;
    html += "<span class='calc-key calc-budget-key'></span> budget</p>";
    out.innerHTML = html;
  }

  function init() {
    const data = window.DIT_CALCULATOR;
    const root = $("form");
    if (!root || !data) return;
    const sel = $("preset");
    for (const name of Object.keys(data.presets)) {
      const o = document.createElement("option");
      o.value = name;
      o.textContent = name;
      sel.appendChild(o);
    }
    sel.value = data.default_preset;
    fillForm(data.presets[data.default_preset]);
    sel.addEventListener("change", () => { fillForm(data.presets[sel.value]); render(); });
    root.addEventListener("input", render);
    root.addEventListener("change", render);
    render();
  }

  window.ditCalculator = {STRATEGIES, COMPONENTS, ditParams, tokens, problems, memory, readForm, fillForm, render};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
