// The page of `inkwash serve`: plain JavaScript over the WebUI-compatible HTTP API, no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 200;
  const PREFERRED_SAMPLERS = ["DPM++ 2M", "Euler", "DDIM"];
  const PNG_PREFIX = "data:image/png;base64,";

  const state = {
    tab: "txt2img",
    samplers: [],
    schedulers: [],
    models: [],
    model: null, // the answer of /inkwash/v1/model for the chosen model
    modelName: null, // sent as override_settings.sd_model_checkpoint
    stepsFromDefault: true, // steps follow the sampler's default until the user edits them
    cfgFromDefault: true, // the CFG scale follows the model's kind (2 for classes, 7 for text) until edited
    running: false,
    poll: null, // the token of the running progress poll
    lastPreview: null,
    lastSeed: null,
    init: null, // {dataUrl, width, height}
    mask: null, // Uint8Array(width * height), 1 = regenerate
    stroke: null, // {value, last: {x, y}} while painting
    pngParams: null,
    pngDataUrl: null,
  };

  // ---------- the API ----------

  class ApiError extends Error {}

  async function api(path, body) {
    const init = { method: body === undefined ? "GET" : "POST", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(`Cannot reach the server: ${err.message}`);
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`.trim();
      if (data && typeof data.error === "string") message = data.error;
      else if (data && typeof data.detail === "string") message = data.detail;
      throw new ApiError(`${message} (HTTP ${response.status})`);
    }
    if (data === null) throw new ApiError(`The server sent an answer that is not JSON (${path})`);
    return data;
  }

  // ---------- messages ----------

  function showMessage(text, kind = "error") {
    $("message-text").textContent = text;
    $("message").className = `message ${kind}`;
    $("message").hidden = false;
  }

  function hideMessage() {
    $("message").hidden = true;
    $("message-text").textContent = "";
  }

  // ---------- small helpers ----------

  function setOptions(select, items, keep) {
    select.replaceChildren(
      ...items.map(([value, label]) => {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = label;
        return option;
      }),
    );
    if (keep !== undefined && items.some(([value]) => value === keep)) select.value = keep;
  }

  function linkSlider(rangeId, numberId, onUserInput) {
    const range = $(rangeId);
    const number = $(numberId);
    range.addEventListener("input", () => {
      number.value = range.value;
      if (onUserInput) onUserInput();
    });
    number.addEventListener("input", () => {
      if (number.value !== "") range.value = number.value;
      if (onUserInput) onUserInput();
    });
  }

  function setNumber(id, value) {
    $(id).value = value;
    const range = $(`${id}-range`);
    if (range) range.value = value;
  }

  function numberOrNull(id) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    return Number(raw);
  }

  function formatSeconds(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "–";
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const minutes = Math.floor(seconds / 60);
    return `${minutes} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  }

  function parseInfo(info) {
    if (info && typeof info === "object") return info;
    try {
      return JSON.parse(info || "{}");
    } catch {
      return {};
    }
  }

  function asDataUrl(image) {
    return image.startsWith("data:") ? image : PNG_PREFIX + image;
  }

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => resolve(image);
      image.onerror = () => reject(new Error("the file is not an image this browser can read"));
      image.src = src;
    });
  }

  const lower = (value) => String(value).trim().toLowerCase();

  function findSampler(name) {
    const key = lower(name);
    return state.samplers.find((s) => lower(s.name) === key || (s.aliases || []).some((a) => lower(a) === key));
  }

  function findScheduler(name) {
    const key = lower(name);
    return state.schedulers.find((s) => lower(s.label) === key || lower(s.name) === key);
  }

  // ---------- tabs ----------

  const TABS = ["txt2img", "img2img", "pnginfo"];

  function switchTab(name) {
    state.tab = name;
    for (const tab of TABS) {
      const button = $(`tab-${tab}`);
      const selected = tab === name;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
    }
    document.body.dataset.tab = name;
    $("workspace").hidden = name === "pnginfo";
    $("workspace").setAttribute("aria-labelledby", `tab-${name === "pnginfo" ? "txt2img" : name}`);
    $("pnginfo-panel").hidden = name !== "pnginfo";
    $("img2img-input").hidden = name !== "img2img";
  }

  function wireTabs() {
    const list = document.querySelector(".tabs");
    list.addEventListener("click", (event) => {
      const button = event.target.closest("[role=tab]");
      if (button) switchTab(button.dataset.tab);
    });
    list.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = TABS[(TABS.indexOf(state.tab) + step + TABS.length) % TABS.length];
      switchTab(next);
      $(`tab-${next}`).focus();
      event.preventDefault();
    });
  }

  // ---------- the model and the menus ----------

  function defaultSteps(samplerName) {
    const table = (state.model && state.model.default_steps) || {};
    if (table[samplerName] !== undefined) return table[samplerName];
    const sampler = findSampler(samplerName);
    for (const alias of (sampler && sampler.aliases) || []) if (table[alias] !== undefined) return table[alias];
    return 50;
  }

  function applySamplerDefaultSteps() {
    if (!state.stepsFromDefault || !state.model) return;
    setNumber("steps", Math.min(defaultSteps($("sampler").value), state.model.max_steps || 1000));
  }

  const textModel = () => Boolean(state.model && state.model.text_conditional);

  function describeModel(model) {
    const colour = model.channels === 1 ? "grayscale" : model.channels === 3 ? "RGB" : `${model.channels} channels`;
    const classes = model.classes.length ? `${model.classes.length} classes` : "unconditional";
    const size = model.text_conditional
      ? `text prompts · ${model.width}×${model.height} by default`
      : `${model.width}×${model.height} ${colour} · ${classes}`;
    return state.models.length > 1 ? size : `${model.name} · ${size}`; // the menu shows the name already
  }

  async function loadModel(name) {
    const query = name ? `?name=${encodeURIComponent(name)}` : "";
    const model = await api(`inkwash/v1/model${query}`);
    model.classes = model.classes || [];
    state.model = model;
    $("model-info").textContent = describeModel(model);

    const classes = model.classes.map((c) => [c, c]);
    const text = Boolean(model.text_conditional);
    const conditional = classes.length > 0;
    setOptions($("prompt"), [["", "(unconditional)"], ...classes], $("prompt").value);
    setOptions($("negative-prompt"), [["", "(none)"], ...classes], $("negative-prompt").value);
    $("prompt").disabled = !conditional;
    $("negative-prompt").disabled = !conditional;
    $("cfg").disabled = !(conditional || text);
    $("cfg-range").disabled = !(conditional || text);
    if (state.cfgFromDefault) setNumber("cfg", text ? 7 : 2);
    // A text-conditional model (Stable Diffusion) takes a prompt and any size in its multiples; the others
    // take classes and make their own size only.
    $("class-fields").hidden = text;
    $("text-fields").hidden = !text;
    if (text) {
      const multiple = model.size_multiple || 8;
      for (const id of ["width", "height"]) {
        $(id).step = String(multiple);
        $(id).min = String(multiple);
      }
      $("width").value = String(model.width);
      $("height").value = String(model.height);
    }

    const maxSteps = model.max_steps || 1000;
    for (const id of ["steps", "steps-range"]) $(id).max = maxSteps;
    $("batch-size").max = model.max_batch_size || 16;
    $("batch-count").max = model.max_images || 64;
    applySamplerDefaultSteps();
  }

  async function loadMenus() {
    const [samplers, schedulers, models, options] = await Promise.all([
      api("sdapi/v1/samplers"),
      api("sdapi/v1/schedulers"),
      api("sdapi/v1/sd-models"),
      api("sdapi/v1/options"),
    ]);
    state.samplers = samplers;
    state.schedulers = schedulers;
    state.models = models;

    setOptions(
      $("sampler"),
      samplers.map((s) => [s.name, s.name]),
    );
    const preferred = PREFERRED_SAMPLERS.find((name) => samplers.some((s) => s.name === name));
    if (preferred) $("sampler").value = preferred;
    setOptions(
      $("scheduler"),
      schedulers.map((s) => [s.label || s.name, s.label || s.name]),
    );
    const automatic = findScheduler("automatic");
    if (automatic) $("scheduler").value = automatic.label || automatic.name;

    // The menu and the requests use model_name: the server accepts it everywhere (titles carry the hash).
    for (const m of models) m.model_name = m.model_name || m.title;
    setOptions(
      $("model"),
      models.map((m) => [m.model_name, m.model_name]),
    );
    const current = options && options.sd_model_checkpoint;
    const chosen = models.find((m) => m.title === current || m.model_name === current) || models[0];
    $("model-picker").hidden = models.length < 2;
    if (chosen) $("model").value = chosen.model_name;
    await loadModel(chosen ? chosen.model_name : undefined);
    state.modelName = state.model.name;
  }

  async function changeModel() {
    const name = $("model").value;
    $("generate").disabled = true;
    try {
      await loadModel(name);
      state.modelName = state.model.name;
      hideMessage();
    } catch (err) {
      showMessage(`Could not load model ${name}: ${err.message}`);
      $("model").value = state.modelName;
    } finally {
      $("generate").disabled = state.running;
    }
  }

  // ---------- requests ----------

  function checkedSize(id, label) {
    const multiple = (state.model && state.model.size_multiple) || 8;
    const value = numberOrNull(id);
    if (value === null || !Number.isInteger(value) || value < multiple || value % multiple !== 0) {
      throw new Error(`${label} must be a positive multiple of ${multiple}.`);
    }
    return value;
  }

  function baseRequest() {
    const text = textModel();
    const request = {
      prompt: text ? $("prompt-text").value : $("prompt").value,
      negative_prompt: text ? $("negative-text").value : $("negative-prompt").value,
      sampler_name: $("sampler").value,
      scheduler: $("scheduler").value,
      seed: numberOrNull("seed") ?? -1,
      override_settings: { sd_model_checkpoint: state.modelName },
      send_images: true,
    };
    const numbers = { steps: "steps", cfg_scale: "cfg", batch_size: "batch-size", n_iter: "batch-count" };
    for (const [field, id] of Object.entries(numbers)) {
      if ($(id).disabled) continue; // CFG scale, for an unconditional model
      const value = numberOrNull(id);
      if (value !== null) request[field] = value;
    }
    const eta = numberOrNull("eta");
    if (eta !== null) request.eta = eta;
    const churn = numberOrNull("s-churn");
    if (churn !== null) request.s_churn = churn;
    if (text) {
      request.width = checkedSize("width", "Width");
      request.height = checkedSize("height", "Height");
    } else if (state.model) {
      request.width = state.model.width;
      request.height = state.model.height;
    }
    return request;
  }

  function img2imgRequest() {
    if (!state.init) throw new Error("Choose or drop an input image first.");
    const request = baseRequest();
    request.init_images = [state.init.dataUrl];
    request.denoising_strength = numberOrNull("denoise") ?? 0.75;
    request.mask_blur = numberOrNull("mask-blur") ?? 4;
    request.inpainting_fill = Number($("inpainting-fill").value);
    request.inpainting_mask_invert = $("mask-invert").checked ? 1 : 0;
    if (state.mask && state.mask.some((v) => v)) request.mask = maskDataUrl();
    return request;
  }

  // ---------- progress ----------

  function setProgress(fraction, text) {
    const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    $("progress-fill").style.width = `${percent}%`;
    $("progress-bar").setAttribute("aria-valuenow", String(percent));
    if (text !== undefined) $("progress-text").textContent = text;
  }

  function showPreview(src) {
    if (src === state.lastPreview) return;
    state.lastPreview = src;
    $("preview").src = src;
    $("preview").hidden = false;
    $("preview-empty").hidden = true;
  }

  // Whole-number scaling keeps every pixel the same size: a 16 px image shows at 256 px, a batch grid as
  // large as the box allows.
  function fitPreview() {
    const image = $("preview");
    const { naturalWidth: width, naturalHeight: height } = image;
    if (!width || !height) return;
    const room = Math.max(64, $("preview-box").clientWidth - 24);
    const scale = Math.max(1, Math.floor(Math.min(room / width, 256 / height)));
    image.style.width = `${width * scale}px`;
    image.style.height = `${height * scale}px`;
  }

  function showProgress(answer) {
    const job = answer.state || {};
    const idle = !job.job && !(answer.progress > 0);
    if (idle) {
      $("progress-text").textContent = "Waiting for the server…";
      return;
    }
    const parts = [`${Math.round((answer.progress || 0) * 100)}%`];
    if (answer.eta_relative !== undefined && answer.eta_relative !== null) {
      parts.push(`ETA ${formatSeconds(answer.eta_relative)}`);
    }
    if (job.sampling_steps) parts.push(`step ${job.sampling_step}/${job.sampling_steps}`);
    if (job.job_count > 1) parts.push(`batch ${Math.min((job.job_no || 0) + 1, job.job_count)}/${job.job_count}`);
    if (job.interrupted) parts.push("interrupting…");
    setProgress(answer.progress || 0, parts.join(" · "));
    if (answer.current_image) showPreview(asDataUrl(answer.current_image));
  }

  function startPolling() {
    const token = {};
    state.poll = token;
    const tick = async () => {
      if (state.poll !== token) return;
      try {
        const answer = await api("sdapi/v1/progress");
        if (state.poll === token) showProgress(answer);
      } catch {
        // A missed poll is not worth a message: the next one follows.
      }
      if (state.poll === token) setTimeout(tick, POLL_MS);
    };
    setTimeout(tick, POLL_MS / 2);
  }

  function stopPolling() {
    state.poll = null;
  }

  // ---------- generation ----------

  function setRunning(running) {
    state.running = running;
    document.body.classList.toggle("busy", running);
    $("generate").disabled = running;
    $("generate").textContent = running ? "Generating…" : "Generate";
    $("interrupt").disabled = !running;
    $("generate").setAttribute("aria-busy", String(running));
  }

  async function generate() {
    if (state.running || !state.model) return;
    const mode = state.tab === "img2img" ? "img2img" : "txt2img";
    let request;
    try {
      request = mode === "img2img" ? img2imgRequest() : baseRequest();
    } catch (err) {
      showMessage(err.message);
      return;
    }
    hideMessage();
    setRunning(true);
    setProgress(0, "Starting…");
    const started = performance.now();
    startPolling();
    try {
      const result = await api(`sdapi/v1/${mode}`, request);
      stopPolling();
      const info = parseInfo(result.info);
      const count = addResults(result.images || [], info);
      const seconds = (performance.now() - started) / 1000;
      const noun = count === 1 ? "image" : "images";
      if (info.interrupted) {
        setProgress(1, `Interrupted: ${count} ${noun} after ${formatSeconds(seconds)}`);
      } else {
        setProgress(1, `Done: ${count} ${noun} in ${formatSeconds(seconds)}`);
      }
    } catch (err) {
      stopPolling();
      setProgress(0, "Failed");
      showMessage(err.message);
    } finally {
      setRunning(false);
    }
  }

  async function interrupt() {
    $("interrupt").disabled = true;
    $("progress-text").textContent = "Interrupting…";
    try {
      await api("sdapi/v1/interrupt", {});
    } catch (err) {
      showMessage(`Interrupt failed: ${err.message}`);
      $("interrupt").disabled = !state.running;
    }
  }

  // ---------- gallery ----------

  function seedOf(infotext) {
    const match = /(?:^|[\s,])Seed: (-?\d+)/.exec(infotext || "");
    return match ? Number(match[1]) : null;
  }

  function addResults(images, info) {
    const first = Number.isInteger(info.index_of_first_image) ? info.index_of_first_image : 0;
    const infotexts = info.infotexts || [];
    const seeds = info.all_seeds || [];
    const prompts = info.all_prompts || [];
    const cards = [];
    images.forEach((image, i) => {
      if (i < first) return; // a grid of the batch, when the server sends one
      const k = i - first;
      const infotext = (infotexts.length === images.length ? infotexts[i] : infotexts[k]) || "";
      const seed = seeds[k] ?? seedOf(infotext) ?? info.seed;
      const prompt = prompts[k] ?? info.prompt ?? "";
      cards.push(galleryCard(asDataUrl(image), infotext, seed, prompt, info.interrupted, textModel()));
    });
    if (cards.length) {
      const firstSeed = seeds[0] ?? seedOf(infotexts[first]) ?? info.seed;
      if (firstSeed !== undefined && firstSeed !== null) state.lastSeed = firstSeed;
      showPreview(cards[0].querySelector("img").src);
      $("gallery").prepend(...cards);
      $("gallery").classList.remove("empty");
    }
    return cards.length;
  }

  function galleryCard(src, infotext, seed, prompt, interrupted, text) {
    const card = $("gallery-item").content.firstElementChild.cloneNode(true);
    const image = card.querySelector(".shot-img");
    image.src = src;
    const what = text ? `prompt "${prompt}"` : prompt ? `class ${prompt}` : "unconditional";
    image.alt = `Generated image, ${what}, seed ${seed}`;
    card.dataset.seed = String(seed);
    card.querySelector(".shot-title").textContent = `Seed ${seed}${interrupted ? " · interrupted" : ""}`;
    card.querySelector(".shot-title").title = what;
    const link = card.querySelector(".shot-download");
    link.href = src;
    link.download = `inkwash-${seed}.png`;
    link.setAttribute("aria-label", `Download the image of seed ${seed}`);
    card.querySelector(".infotext").textContent = infotext;
    card.querySelector(".shot-img2img").addEventListener("click", () => {
      switchTab("img2img");
      setInitImage(src);
    });
    image.addEventListener("click", () => {
      state.lastSeed = seed;
      for (const other of $("gallery").querySelectorAll(".shot.selected")) other.classList.remove("selected");
      card.classList.add("selected");
    });
    return card;
  }

  // ---------- img2img: the input image and the mask ----------

  async function setInitImage(dataUrl) {
    let image;
    try {
      image = await loadImage(dataUrl);
    } catch (err) {
      showMessage(`Cannot use this file: ${err.message}.`);
      return;
    }
    const width = image.naturalWidth;
    const height = image.naturalHeight;
    state.init = { dataUrl, width, height };
    state.mask = new Uint8Array(width * height);
    const canvas = $("mask-canvas");
    canvas.width = width;
    canvas.height = height;
    const box = 256;
    const scale = box / Math.max(width, height);
    const size = { width: `${Math.round(width * scale)}px`, height: `${Math.round(height * scale)}px` };
    for (const element of [$("canvas-stack"), $("init-image"), canvas]) Object.assign(element.style, size);
    $("init-image").src = dataUrl;
    $("canvas-stack").hidden = false;
    $("init-hint").hidden = true;
    $("init-replace").hidden = false;
    const brush = $("brush-size");
    brush.max = String(Math.max(2, Math.round(Math.max(width, height) / 2)));
    brush.value = String(Math.max(1, Math.round(Math.min(width, height) / 6)));
    updateBrushLabel();
    drawMask();
  }

  function updateBrushLabel() {
    $("brush-size-out").textContent = `${$("brush-size").value} px`;
  }

  function toImagePoint(event) {
    const rect = $("mask-canvas").getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) / rect.width) * state.init.width,
      y: ((event.clientY - rect.top) / rect.height) * state.init.height,
    };
  }

  // Marks every pixel whose centre lies within the brush radius of the segment a-b.
  function paintSegment(a, b, value) {
    const { width, height } = state.init;
    const radius = Math.max(Number($("brush-size").value) / 2, Math.SQRT1_2);
    const x0 = Math.max(0, Math.floor(Math.min(a.x, b.x) - radius));
    const x1 = Math.min(width - 1, Math.ceil(Math.max(a.x, b.x) + radius));
    const y0 = Math.max(0, Math.floor(Math.min(a.y, b.y) - radius));
    const y1 = Math.min(height - 1, Math.ceil(Math.max(a.y, b.y) + radius));
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const length2 = dx * dx + dy * dy;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const px = x + 0.5;
        const py = y + 0.5;
        const t = length2 ? Math.max(0, Math.min(1, ((px - a.x) * dx + (py - a.y) * dy) / length2)) : 0;
        const ex = a.x + t * dx - px;
        const ey = a.y + t * dy - py;
        if (ex * ex + ey * ey <= radius * radius) state.mask[y * width + x] = value;
      }
    }
  }

  function drawMask() {
    if (!state.init) return;
    const { width, height } = state.init;
    const context = $("mask-canvas").getContext("2d");
    const pixels = context.createImageData(width, height);
    for (let i = 0; i < state.mask.length; i++) {
      if (!state.mask[i]) continue;
      pixels.data.set([255, 92, 138, 170], i * 4);
    }
    context.putImageData(pixels, 0, 0);
  }

  function maskDataUrl() {
    const { width, height } = state.init;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(width, height);
    for (let i = 0; i < state.mask.length; i++) {
      const v = state.mask[i] ? 255 : 0;
      pixels.data.set([v, v, v, 255], i * 4);
    }
    context.putImageData(pixels, 0, 0);
    return canvas.toDataURL("image/png");
  }

  function wireMask() {
    const canvas = $("mask-canvas");
    canvas.addEventListener("pointerdown", (event) => {
      if (!state.init) return;
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      const erase = event.button === 2 || event.shiftKey;
      const point = toImagePoint(event);
      state.stroke = { value: erase ? 0 : 1, last: point };
      paintSegment(point, point, state.stroke.value);
      drawMask();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!state.stroke) return;
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
      for (const each of events.length ? events : [event]) {
        const point = toImagePoint(each);
        paintSegment(state.stroke.last, point, state.stroke.value);
        state.stroke.last = point;
      }
      drawMask();
    });
    const end = () => {
      state.stroke = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());
    $("mask-clear").addEventListener("click", () => {
      if (!state.mask) return;
      state.mask.fill(0);
      drawMask();
    });
    $("brush-size").addEventListener("input", updateBrushLabel);
  }

  // ---------- file inputs and drops ----------

  async function droppedDataUrl(event) {
    const file = event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) return readFile(file);
    const uri = (event.dataTransfer.getData("text/uri-list") || event.dataTransfer.getData("text/plain") || "").trim();
    if (uri.startsWith("data:image/")) return uri;
    return null;
  }

  function wireDropZone(zone, input, onDataUrl) {
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", async (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      try {
        const dataUrl = await droppedDataUrl(event);
        if (dataUrl) await onDataUrl(dataUrl);
        else showMessage("Drop an image file here.");
      } catch (err) {
        showMessage(err.message);
      }
    });
    zone.addEventListener("keydown", (event) => {
      if ((event.key === "Enter" || event.key === " ") && event.target === zone) {
        event.preventDefault();
        input.click();
      }
    });
    input.addEventListener("change", async () => {
      const file = input.files && input.files[0];
      if (!file) return;
      try {
        await onDataUrl(await readFile(file));
      } catch (err) {
        showMessage(err.message);
      }
      input.value = "";
    });
  }

  // ---------- PNG info ----------

  function paramRows(entries) {
    return entries.map(([key, value]) => {
      const row = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = key;
      const cell = document.createElement("td");
      cell.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
      row.append(name, cell);
      return row;
    });
  }

  async function readPngInfo(dataUrl) {
    state.pngDataUrl = dataUrl;
    $("pnginfo-image").src = dataUrl;
    $("pnginfo-image").hidden = false;
    $("pnginfo-out").textContent = "Reading…";
    $("pnginfo-params").tBodies[0].replaceChildren();
    $("pnginfo-send").disabled = true;
    $("pnginfo-send-img2img").disabled = true;
    let answer;
    try {
      answer = await api("sdapi/v1/png-info", { image: dataUrl });
    } catch (err) {
      $("pnginfo-out").textContent = "";
      showMessage(`PNG info: ${err.message}`);
      return;
    }
    hideMessage();
    const params = answer.parameters || {};
    state.pngParams = params;
    $("pnginfo-out").textContent = answer.info || "This PNG has no generation parameters.";
    const items = Object.entries(answer.items || {}).filter(([key]) => key !== "parameters");
    $("pnginfo-params").tBodies[0].replaceChildren(...paramRows([...Object.entries(params), ...items]));
    const usable = Object.keys(params).length > 0;
    $("pnginfo-send").disabled = !usable;
    $("pnginfo-send-img2img").disabled = !usable;
  }

  function pick(params, ...keys) {
    for (const key of keys) if (params[key] !== undefined && params[key] !== null && params[key] !== "") return params[key];
    return undefined;
  }

  async function applyParameters(params) {
    const problems = [];
    const model = pick(params, "Model");
    if (model !== undefined && state.models.length > 1) {
      const entry = state.models.find((m) => m.model_name === model || m.title === model);
      if (entry && entry.model_name !== state.modelName) {
        $("model").value = entry.model_name;
        await changeModel();
      } else if (!entry) {
        problems.push(`model ${model} is not served here`);
      }
    }
    const classes = (state.model && state.model.classes) || [];
    const text = textModel();
    for (const [key, id] of [
      ["Prompt", text ? "prompt-text" : "prompt"],
      ["Negative prompt", text ? "negative-text" : "negative-prompt"],
    ]) {
      const value = String(pick(params, key) ?? "").trim();
      if (text || value === "" || classes.includes(value)) $(id).value = value;
      else problems.push(`${key.toLowerCase()} "${value}" is not one of this model's classes`);
    }
    const samplerName = pick(params, "Sampler");
    if (samplerName !== undefined) {
      const sampler = findSampler(samplerName);
      if (sampler) $("sampler").value = sampler.name;
      else problems.push(`unknown sampler ${samplerName}`);
    }
    const scheduleName = pick(params, "Schedule type") ?? "Automatic";
    const schedule = findScheduler(scheduleName);
    if (schedule) $("scheduler").value = schedule.label || schedule.name;
    else problems.push(`unknown schedule type ${scheduleName}`);

    const numbers = [
      ["steps", ["Steps"]],
      ["cfg", ["CFG scale"]],
      ["seed", ["Seed"]],
      ["batch-size", ["Batch size"]],
      ["denoise", ["Denoising strength"]],
      ["mask-blur", ["Mask blur"]],
    ];
    for (const [id, keys] of numbers) {
      const value = pick(params, ...keys);
      if (value !== undefined) setNumber(id, Number(value));
    }
    if (pick(params, "Steps") !== undefined) state.stepsFromDefault = false;
    if (pick(params, "CFG scale") !== undefined) state.cfgFromDefault = false;
    const eta = pick(params, "Eta", "Eta DDIM", "ETA");
    $("eta").value = eta === undefined ? "" : String(Number(eta));
    const churn = pick(params, "Sigma churn", "S churn", "s_churn");
    $("s-churn").value = churn === undefined ? "" : String(Number(churn));
    if (eta !== undefined || churn !== undefined) $("advanced").open = true;

    const width = pick(params, "Size-1");
    const height = pick(params, "Size-2");
    if (text && width !== undefined && height !== undefined) {
      $("width").value = String(Number(width));
      $("height").value = String(Number(height));
    } else if (state.model && width !== undefined && (Number(width) !== state.model.width || Number(height) !== state.model.height)) {
      problems.push(`the image is ${width}×${height}, this model makes ${state.model.width}×${state.model.height}`);
    }
    if (problems.length) showMessage(`Some parameters were not applied: ${problems.join("; ")}.`, "warning");
    else hideMessage();
  }

  // ---------- start ----------

  function wire() {
    wireTabs();
    linkSlider("steps-range", "steps", () => {
      state.stepsFromDefault = false;
    });
    linkSlider("cfg-range", "cfg", () => {
      state.cfgFromDefault = false;
    });
    linkSlider("denoise-range", "denoise");
    linkSlider("mask-blur-range", "mask-blur");
    $("sampler").addEventListener("change", applySamplerDefaultSteps);
    $("preview").addEventListener("load", fitPreview);
    window.addEventListener("resize", fitPreview);
    $("model").addEventListener("change", changeModel);
    $("seed-random").addEventListener("click", () => {
      $("seed").value = "-1";
    });
    $("seed-reuse").addEventListener("click", () => {
      if (state.lastSeed === null) showMessage("No image yet: generate one first to reuse its seed.", "info");
      else $("seed").value = String(state.lastSeed);
    });
    $("generate").addEventListener("click", generate);
    $("interrupt").addEventListener("click", interrupt);
    $("message-close").addEventListener("click", hideMessage);
    $("gallery-clear").addEventListener("click", () => $("gallery").replaceChildren());
    $("settings").addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && state.tab !== "pnginfo") {
        event.preventDefault();
        generate();
      }
    });
    wireMask();
    wireDropZone($("init-drop"), $("init-file"), setInitImage);
    $("init-replace").addEventListener("click", () => $("init-file").click());
    wireDropZone($("pnginfo-drop"), $("pnginfo-file"), readPngInfo);
    $("pnginfo-send").addEventListener("click", () => {
      switchTab("txt2img");
      applyParameters(state.pngParams || {});
    });
    $("pnginfo-send-img2img").addEventListener("click", async () => {
      switchTab("img2img");
      await applyParameters(state.pngParams || {});
      if (state.pngDataUrl) await setInitImage(state.pngDataUrl);
    });
  }

  async function start() {
    wire();
    switchTab("txt2img");
    try {
      await loadMenus();
    } catch (err) {
      $("model-info").textContent = "no model";
      showMessage(`Could not load the model and the sampler lists: ${err.message}`);
      return;
    }
    $("generate").disabled = false;
    document.body.dataset.ready = "true";
  }

  start();
})();
