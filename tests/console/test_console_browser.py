"""The console in a real headless Chromium: log in at the identity provider's form, create a
tenant and a key (its secret shown once), upload an adapter (the progress bar moves), send
traffic with the official openai client, and watch the usage chart take it in. Screenshots
go to ``LORAPLEX_TEST_ARTIFACTS`` (a directory) or under pytest's tmp path. The audit log
then holds one row per action, and none holds a secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from browser import find_chromium, start_browser
from console_live import BASE, ConsoleServer
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

TENANT = "browser-co"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("LORAPLEX_TEST_ARTIFACTS")
    if configured:
        path = Path(configured) / "console"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("console-artifacts")


@pytest.fixture(scope="module")
def browser(artifacts: Path) -> Iterator[WebDriver]:
    driver = start_browser(find_chromium(), artifacts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    def __init__(self, driver: WebDriver, base: str, artifacts: Path) -> None:
        self.d, self.base, self.artifacts = driver, base, artifacts
        self.shots = 0

    def wait(self, condition, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        # a page's script re-renders the nodes a condition reads (after a change, on each
        # usage poll): between finding one and reading it, Chromium may answer "node does
        # not belong to the document" (a plain WebDriverException), so the poll retries
        # those too; a condition never met still ends in a TimeoutException
        return WebDriverWait(self.d, timeout, ignored_exceptions=(WebDriverException,)).until(
            condition
        )

    def css(self, selector: str):  # type: ignore[no-untyped-def]
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def text(self, selector: str) -> str:
        """The element's text once it is there (a page's script may render it after the
        load: on a loaded box, past 2 s), found again if a re-render detaches it while it
        is read."""
        found = self.wait(lambda d: (d.find_element(By.CSS_SELECTOR, selector).text,))
        return str(found[0])  # (a tuple: an empty text is an answer too)

    def status(self, text: str) -> None:
        self.wait(ec.text_to_be_present_in_element((By.ID, "status"), text))

    def shot(self, name: str) -> None:
        self.shots += 1
        self.d.save_screenshot(str(self.artifacts / f"{self.shots:02d}-{name}.png"))


def _log_in(page: Page, login: str) -> None:
    page.d.get(page.base + "/console/tenants")
    page.wait(ec.url_contains("/console/login"))
    page.shot("login-page")
    page.css("#sso").click()
    for _ in range(3):  # the provider's login form, then its consent form
        page.wait(ec.presence_of_element_located((By.CSS_SELECTOR, "form button, form input")))
        if page.d.current_url.startswith(page.base + "/console/"):
            break
        fields = page.d.find_elements(By.NAME, "login")
        if fields:
            fields[0].send_keys(login)
            page.d.find_element(By.NAME, "password").send_keys("any password")
            page.shot("provider-login")
        page.d.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
        page.wait(
            lambda d: "/interaction/" not in d.current_url or d.find_elements(By.NAME, "prompt")
        )
    page.wait(ec.url_to_be(page.base + "/console/tenants"))


def test_console_in_chromium(
    console_server: ConsoleServer,
    browser: WebDriver,
    artifacts: Path,
    tiny_llama_dir: Path,
    make_peft_adapter,  # type: ignore[no-untyped-def]
) -> None:
    with console_server.admin() as admin:  # a priced plan, so that spend is not zero
        plan = {"name": "metered", "prompt_price_micros": 2_000_000,
                "completion_price_micros": 5_000_000}  # fmt: skip
        assert admin.post("/admin/v1/plans", json=plan).status_code == 201
    page = Page(browser, console_server.url, artifacts)
    _log_in(page, "alice")
    assert "alice (admin)" in page.text("#whoami")

    # a tenant
    page.css("#tenant-name").send_keys(TENANT)
    page.css("#tenant-plan").send_keys("metered")
    page.css("#new-requests_per_minute").send_keys("600")
    page.css("#create-tenant button[type=submit]").click()
    page.status(f"Tenant {TENANT} created.")
    row = page.css(f'#tenants tr[data-tenant="{TENANT}"]')
    assert "requests_per_minute=600" in row.text
    assert browser.switch_to.active_element.tag_name == "h1"  # focus moved to the heading
    page.shot("tenant-created")

    # a key: the secret is shown once, focus goes to it, and a reload forgets it
    browser.get(f"{console_server.url}/console/tenants/{TENANT}")
    page.css("#key-name").send_keys("browser key")
    page.css("#create-key button[type=submit]").click()
    page.wait(ec.visibility_of_element_located((By.ID, "secret-panel")))
    secret = page.css("#secret").get_attribute("value")
    assert secret and secret.startswith("lpx_")
    page.status("shown only this once")
    assert browser.switch_to.active_element.get_attribute("id") in ("secret-heading", "secret")
    page.shot("key-secret-shown-once")
    browser.refresh()
    page.wait(ec.presence_of_element_located((By.ID, "keys")))
    assert secret not in browser.page_source
    assert "browser key" in page.text("#keys")

    # rotate it: a new secret, shown once too; the old one stops working
    page.css("#keys button[data-action=rotate-key]").click()
    page.status("Key rotated")
    rotated = page.css("#secret").get_attribute("value")
    assert rotated and rotated.startswith("lpx_") and rotated != secret
    page.css("#secret-done").click()
    page.status("no longer shown")
    assert rotated not in browser.page_source and secret not in browser.page_source
    old_key = openai.OpenAI(api_key=secret, base_url=f"{console_server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        old_key.models.list()
    secrets_shown = [secret, rotated]
    secret = rotated

    # status and limits
    limit = page.css("#edit-tokens_per_minute")
    limit.clear()
    limit.send_keys("90000")
    page.css("#edit-tenant button[type=submit]").click()
    page.status(f"Tenant {TENANT} saved.")
    assert "tokens_per_minute=90000" in page.text("#tenant-limits")

    # an adapter upload, with progress (recorded across the reload that follows success)
    adapter = make_peft_adapter(tiny_llama_dir, rank=8, targets=["q_proj", "v_proj"], seed=31)
    browser.execute_script(
        """
        const bar = document.getElementById('upload-progress');
        new MutationObserver(() => {
          const seen = Number(sessionStorage.getItem('seen-progress') || 0);
          sessionStorage.setItem('seen-progress', String(Math.max(seen, bar.value)));
        }).observe(bar, {attributes: true});
        """
    )
    page.css("#adapter-name").send_keys("support")
    files = page.css("#adapter-files")
    files.send_keys(
        str(adapter / "adapter_config.json") + "\n" + str(adapter / "adapter_model.safetensors")
    )
    page.css("#upload-adapter button[type=submit]").click()
    page.status("Uploaded support version 1.")
    assert browser.execute_script("return sessionStorage.getItem('seen-progress')") == "100"
    assert page.text('#adapters tr[data-adapter="support"]').startswith("support (current)")
    page.css("#alias-name").send_keys("prod")
    page.css("#alias-version").send_keys("1")
    page.css("#set-alias button[type=submit]").click()
    page.status("Alias prod now points at support@1.")
    page.shot("adapter-uploaded")

    # the usage page before traffic, then traffic through the gateway with the new key
    browser.get(f"{console_server.url}/console/usage?tenant={TENANT}")
    page.wait(ec.text_to_be_present_in_element((By.ID, "usage-table"), "No usage"))
    page.shot("usage-before")
    sdk = openai.OpenAI(api_key=secret, base_url=f"{console_server.url}/v1", max_retries=0)
    for _ in range(3):
        out = sdk.chat.completions.create(
            model="prod", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert out.usage is not None and out.usage.completion_tokens > 0
    base = sdk.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert base.usage is not None
    support_row = '#usage-table tr[data-adapter="support"] td'

    def three_requests(d: WebDriver) -> bool:  # the page polls every 5 s
        cells = d.find_elements(By.CSS_SELECTOR, support_row)
        return len(cells) > 2 and cells[2].text == "3"

    page.wait(three_requests, timeout=30)
    totals = browser.execute_script(
        "return Chart.getChart('tokens-chart').data.datasets.map("
        "d => [d.label, d.data.reduce((a, b) => a + b, 0)])"
    )
    assert dict(totals)["support"] > 0
    spend = browser.execute_script(
        "return Chart.getChart('spend-chart').data.datasets.map("
        "d => [d.label, d.data.reduce((a, b) => a + b, 0)])"
    )
    assert dict(spend)["support"] > 0
    page.shot("usage-after-traffic")

    # residency: the engine holds the adapter now
    browser.get(f"{console_server.url}/console/tenants/{TENANT}")
    where = page.text('#adapters tr[data-adapter="support"] td.where')
    assert where in ("GPU", "host"), where
    page.css("#keys button[data-action=revoke-key]").click()
    browser.switch_to.alert.accept()
    page.status("revoked.")
    page.wait(ec.text_to_be_present_in_element((By.ID, "keys"), "revoked"))
    browser.get(f"{console_server.url}/console/engines")
    assert page.text("#engine-state").startswith("ready")
    browser.get(f"{console_server.url}/console/audit?actor=alice")
    page.wait(ec.presence_of_element_located((By.ID, "audit")))
    page.shot("audit-log")

    # one audit row per action, none holding the secret
    with console_server.admin() as admin:
        rows = admin.get("/admin/v1/audit", params={"actor": "alice"}).json()["data"]
        export = admin.get("/admin/v1/audit/export", params={"format": "jsonl"}).text
    actions = sorted(r["action"] for r in rows)
    assert actions == sorted(
        ["console_login", "create_tenant", "create_key", "rotate_key", "update_tenant",
         "upload_adapter", "set_alias", "revoke_key"]
    ), rows  # fmt: skip
    assert all(r["outcome"] in (200, 201) for r in rows)
    for shown in secrets_shown:
        assert shown not in export and shown.split("_")[-1] not in export
    assert console_server.admin_token not in export
    assert page.shots >= 7
