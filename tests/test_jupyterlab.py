"""The course in JupyterLab for real: `jupyter lab` serves a copy of nbs/ on loopback (a token, a free port, its own
config, data, runtime and IPython folders, so your settings are untouched, and a throw-away NANOCHAT_BASE_DIR), and
headless Chromium opens lessons in it through Playwright.

- 19_chat_widget.ipynb: its cells run in a live kernel (JupyterLab's "run all above" command, up to the lesson's
  clean-up cells), the widget renders (ipywidgets' JupyterLab manager, `jupyterlab_widgets`), a message typed into
  its text box + Enter streams the reply into the transcript, the sliders feed the sampler (read back from the
  kernel; at temperature 0 the same question gets the same reply twice), Clear empties the transcript.
- 08_base_train.ipynb: its saved plots render as images.

Screenshots: test-artifacts/jupyterlab_chat_widget.png and test-artifacts/jupyterlab_plots.png. At the end the server
and its kernels are stopped, and psutil checks that none is left.

Needs Debian's chromium (`apt-get install -y chromium`, /usr/bin/chromium) and the playwright package; the test is
skipped, saying why, only when chromium is not installed."""
import ast, json, os, secrets, shutil, socket, subprocess, sys, time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import MIRROR

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WIDGET_NB, PLOTS_NB = "19_chat_widget.ipynb", "08_base_train.ipynb"
SHARDS = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_*.parquet"  # the pretraining shards, in the mirror
CURSOR = "▍"  # the transcript's cursor while a reply streams (nanochat.chat_widget.transcript_html)
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`")

# JupyterLab settings for the test's own config folder: no news or update checks (no request leaves the machine, no
# toast over the screenshots)
SETTINGS = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    "`jupyter lab` on loopback, serving `root`; `stop()` ends it and its kernels."
    def __init__(self, root: Path, tmp: Path, env: dict):
        self.root, self.token, self.port = root, secrets.token_hex(16), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "jupyterlab.log"
        cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp, as Galata does
        if os.geteuid() == 0: cmd.append("--allow-root")  # CI containers run as root; jupyter refuses unless told
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try: self._wait_up(60)
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.base}/api/status", params={"token": self.token}, timeout=2).ok: return
            except requests.ConnectionError: pass
            assert self.proc.poll() is None, f"jupyter lab exited ({self.proc.returncode}):\n{self.log()}"
            assert time.monotonic() < deadline, f"jupyter lab did not answer in {timeout_s} s:\n{self.log()}"
            time.sleep(0.1)  # poll interval

    def url(self, path: str) -> str: return f"{self.base}/lab/tree/{path}?token={self.token}"
    def log(self) -> str: return self.log_path.read_text()[-4000:]

    def kernels(self) -> list:
        return requests.get(f"{self.base}/api/kernels", params={"token": self.token}, timeout=5).json()

    def stop(self) -> list:
        "Stop the server (SIGTERM: it shuts its kernels down), then kill what is left; returns what had to be killed."
        procs = [psutil.Process(self.proc.pid)]
        try: procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess: pass
        self.proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive: p.kill()
        psutil.wait_procs(alive, timeout=10)
        return alive


@pytest.fixture(scope="module")
def lab(tmp_path_factory, endpoint):
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "nbs"
    shutil.copytree(NBS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    dirs = {k: tmp / k.lower() for k in ["JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                                         "NANOCHAT_BASE_DIR", "TMPDIR", "MPLCONFIGDIR"]}
    for d in dirs.values(): d.mkdir()
    for name, settings in SETTINGS.items():
        f = dirs["JUPYTER_CONFIG_DIR"] / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))} | {k: str(v) for k, v in dirs.items()}
    env |= {"HF_ENDPOINT": endpoint, "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            # the toy fixtures (lesson 08b) are built once and shared, as scripts/test.sh does
            "NANOCHAT_TOY_DIR": os.environ.get("NANOCHAT_TOY_DIR") or str(ROOT / ".cache" / "test" / "toy")}
    if not os.environ.get("NANOCHAT_NUM_SHARDS") and MIRROR.is_dir():  # the mirror's last shard is the validation one
        env["NANOCHAT_NUM_SHARDS"] = str(len(list(MIRROR.glob(SHARDS))))
    t0 = time.monotonic()
    server = Lab(root, tmp, env)
    print(f"\njupyter lab up in {time.monotonic() - t0:.1f}s at {server.base}")
    yield server
    kernels, t0 = len(server.kernels()), time.monotonic()
    killed = server.stop()
    print(f"jupyter lab and its {kernels} kernel(s) stopped in {time.monotonic() - t0:.1f}s")
    leftovers = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if str(root) in " ".join(p.info["cmdline"] or []) or str(dirs["JUPYTER_RUNTIME_DIR"]) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, f"processes left after stopping jupyter lab: {[p.info for p in leftovers]}"
    assert not killed, f"had to kill {[p.pid for p in killed]}: jupyter lab did not stop cleanly on SIGTERM\n{server.log()}"


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="light")
        page.set_default_timeout(30_000)
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.dialogs = []  # leaving a notebook with unsaved changes asks "leave the page?": yes (it is a copy)
        page.on("dialog", lambda d: (page.dialogs.append(d.type), d.accept() if d.type == "beforeunload" else d.dismiss()))
        yield page
        browser.close()


def open_notebook(page, lab, path: str, kernel: bool):
    """Open `path` in JupyterLab, with a Python kernel or none. The course's notebooks name no kernel (no `kernelspec` in
    their metadata), so JupyterLab asks which one: the dialog's default is Python 3, its other button is No Kernel."""
    page.goto(lab.url(path))
    page.wait_for_function("(p) => window.jupyterapp?.shell.currentWidget?.context?.path === p", arg=path, timeout=60_000)
    ask = page.locator(".jp-Dialog", has_text="Select Kernel")
    # either JupyterLab asks (a notebook without a kernelspec) or it starts the notebook's kernel by itself
    page.wait_for_function("""() => document.querySelector('.jp-Dialog')
                              || window.jupyterapp.shell.currentWidget.sessionContext.isReady""", timeout=60_000)
    if ask.count(): ask.locator(".jp-mod-accept" if kernel else ".jp-mod-reject").click()
    if kernel:
        page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'",
                               timeout=60_000)


def run_js_command(page, command: str, cell: int, timeout_s: float):
    "Make cell `cell` active and run a JupyterLab command on the notebook; returns what the command's promise gives."
    return page.evaluate("""async ([command, cell, ms]) => {
        const app = window.jupyterapp, panel = app.shell.currentWidget;
        panel.content.activeCellIndex = cell;
        const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error(`${command}: no end in ${ms} ms`)), ms));
        return await Promise.race([app.commands.execute(command), timeout]);
    }""", [command, cell, timeout_s * 1000])


def notebook_errors(page) -> list:
    "The error outputs (exception and the traceback's last lines) of the open notebook's cells."
    return page.evaluate("""() => {
        const errors = [], cells = window.jupyterapp.shell.currentWidget.content.model.cells;
        for (let i = 0; i < cells.length; i++) for (const o of (cells.get(i).toJSON().outputs || []))
            if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}\\n` + o.traceback.slice(-3).join('\\n'));
        return errors; }""")


def kernel_eval(page, expr: str):
    "Evaluate a Python expression in the notebook's kernel (as a cell would, without adding one); its value as JSON."
    out = page.evaluate("""async (code) => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const future = kernel.requestExecute({code, store_history: false});
        let result = null, error = null;
        future.onIOPub = (msg) => {
            if (msg.header.msg_type === 'execute_result') result = msg.content.data['text/plain'];
            if (msg.header.msg_type === 'error') error = msg.content.ename + ': ' + msg.content.evalue;
        };
        await future.done;
        return error ? {error} : {result};
    }""", f"import json as _json; _json.dumps({expr})")
    assert "error" not in out, out
    return json.loads(ast.literal_eval(out["result"]))  # text/plain: the repr of the JSON string


def show(page, el, tries: int = 5):
    """Scroll `el` into view, as a reader would, until it stays there. JupyterLab draws only the cells near the viewport
    (its default windowing mode, CSS content-visibility); cells above, laid out for real for the first time, can push
    `el` down again. So: scroll, watch it frame by frame, scroll again if it is off screen 10 frames on, done when it
    has been on screen in a drawn cell for 5 frames in a row."""
    watch = """(el) => { const r = el.getBoundingClientRect();
        const ok = r.height > 0 && r.top >= 0 && r.bottom <= innerHeight
                   && getComputedStyle(el.closest('.jp-Cell')).contentVisibility === 'visible';
        el.frames = (el.frames || 0) + 1; el.steady = ok ? (el.steady || 0) + 1 : 0;
        return el.steady >= 5 ? 'steady' : !ok && el.frames > 10 ? 'moved' : false; }"""
    for _ in range(tries):
        el.scroll_into_view_if_needed()
        el.evaluate("(el) => { el.frames = el.steady = 0; }")
        if page.wait_for_function(watch, arg=el.element_handle(), polling="raf", timeout=10_000).json_value() == "steady": return
    raise AssertionError(f"{el} did not stay in view after {tries} scrolls")


def cell_index(nb: str, text: str) -> int:
    "The index of the first cell of `nb` whose source holds `text`."
    cells = json.loads((NBS / nb).read_text())["cells"]
    found = [i for i, c in enumerate(cells) if text in "".join(c["source"])]
    assert found, f"no cell of {nb} holds {text!r}: the test needs updating with the lesson"
    return found[0]


def artifact(name: str) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    return str(ARTIFACTS / name)


def test_chat_widget_in_jupyterlab(page, lab):
    from playwright.sync_api import expect
    t0 = time.monotonic()
    open_notebook(page, lab, WIDGET_NB, kernel=True)
    # every cell up to the one that loads your own trained model (then come the clean-up cells): the widget is built
    # around the toy model and driven from code once, as the lesson does
    upto = cell_index(WIDGET_NB, "## Your own model")  # not the cell that loads a trained model (a test machine has none)
    assert run_js_command(page, "notebook:run-all-above", upto, timeout_s=120) is True, notebook_errors(page) or lab.log()
    print(f"notebook open and run in {time.monotonic() - t0:.1f}s")

    chat = page.locator(".widget-vbox", has=page.locator("input[placeholder^='Message the model']")).first
    expect(chat, "no ChatWidget on the page: does JupyterLab have ipywidgets' manager (jupyterlab_widgets)?").to_be_attached(timeout=30_000)
    show(page, chat)
    transcript, text = chat.locator(".widget-html").first, chat.locator("input[type=text]")
    send_button, clear_button = chat.get_by_role("button", name="Send"), chat.get_by_role("button", name="Clear")
    expect(transcript).to_have_text("Say something to start.")  # the lesson ends with chat.clear()

    def readout(name): return chat.locator(".widget-slider", has_text=name).locator(".widget-readout")
    def set_slider(name, value):
        readout(name).fill(str(value))
        readout(name).press("Enter")
    expect(readout("temperature")).to_have_text("0.00")  # the lesson set chat.temperature.value = 0 from Python

    # the sliders, moved in the page, reach the kernel's widget, and the next message reads them into the session
    set_slider("temperature", 1.2)
    set_slider("top-k", 7)
    expect(readout("temperature")).to_have_text("1.20")
    assert kernel_eval(page, "[chat.temperature.value, chat.top_k.value]") == [1.2, 7]

    # a message: Enter in the text box; the reply streams in (a MutationObserver keeps the transcript's text after
    # every update)
    page.evaluate("""(el) => { window.snapshots = [];
        new MutationObserver((records) => { for (const r of records) window.snapshots.push(el.textContent); })
            .observe(el, {subtree: true, childList: true, characterData: true}); }""", transcript.element_handle())

    def send(message) -> str:
        text.fill(message)
        text.press("Enter")
        # done: the user's message is shown, no cursor, the buttons enabled again
        page.wait_for_function("""([el, msg, cursor, button]) => el.textContent.includes(msg) && !el.textContent.includes(cursor)
                                  && !button.disabled""", arg=[transcript.element_handle(), message, CURSOR,
                                                               send_button.element_handle()], timeout=60_000)
        expect(text).to_have_value("")
        bubbles = transcript.locator("div[style*='border-radius']").all_inner_texts()
        assert bubbles[-2] == message, bubbles
        return bubbles[-1]

    reply = send("Hello! Who are you?")
    snapshots = page.evaluate("window.snapshots")
    streaming = [s for s in snapshots if s.endswith(CURSOR)]
    assert reply.strip() and snapshots[-1].endswith(reply), (reply, snapshots[-3:])
    assert len({*streaming}) >= 3, f"the reply did not stream in pieces: {snapshots}"
    partial_replies = [s.removesuffix(CURSOR).split("Hello! Who are you?", 1)[1] for s in streaming]
    assert all(reply.startswith(p) for p in partial_replies), (reply, partial_replies)
    assert len(partial_replies[-1]) > len(partial_replies[0])
    settings = kernel_eval(page, "[chat.session.temperature, chat.session.top_k, [m['role'] for m in chat.history]]")
    assert settings == [1.2, 7, ["user", "assistant"]], settings
    print(f"streamed a {len(reply)}-character reply in {len(snapshots)} transcript updates")

    # temperature 0 (greedy): the same question after Clear gets the same reply
    set_slider("temperature", 0)
    replies = []
    for _ in range(2):
        clear_button.click()
        expect(transcript).to_have_text("Say something to start.")
        replies.append(send("Why is the sky blue?"))
    assert replies[0] == replies[1] and replies[0].strip(), replies
    assert kernel_eval(page, "[chat.session.temperature, chat.session.top_k, len(chat.history)]") == [0, 7, 2]
    send("And the sea?")
    show(page, chat)
    page.screenshot(path=artifact("jupyterlab_chat_widget.png"))

    # Clear empties the transcript and the session
    clear_button.click()
    expect(transcript).to_have_text("Say something to start.")
    assert kernel_eval(page, "[chat.history, chat.turns]") == [[], []]
    assert not page.errors, page.errors
    print(f"widget test: {time.monotonic() - t0:.1f}s")


def test_lesson_plots_render(page, lab):
    "The saved PNG outputs of a lesson show as images (decoded: naturalWidth > 0) in their output areas."
    from playwright.sync_api import expect
    t0 = time.monotonic()
    want = sum("image/png" in o.get("data", {}) for c in json.loads((NBS / PLOTS_NB).read_text())["cells"]
               for o in c.get("outputs", []))
    assert want > 0
    open_notebook(page, lab, PLOTS_NB, kernel=False)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # the open tab (the widget lesson is hidden behind it)
    images = panel.locator(".jp-OutputArea-output img")
    expect(images).to_have_count(want)
    for i in range(want):
        show(page, images.nth(i))
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=images.nth(i).element_handle(), timeout=10_000)
    sizes = images.evaluate_all("(imgs) => imgs.map((i) => [i.naturalWidth, i.naturalHeight])")
    assert all(w > 100 and h > 50 for w, h in sizes), sizes
    page.screenshot(path=artifact("jupyterlab_plots.png"))
    assert not page.errors, page.errors
    print(f"plots test: {len(sizes)} images {sizes} in {time.monotonic() - t0:.1f}s; browser dialogs: {page.dialogs}")
