// Drives the approvals page in Debian's headless Chromium: sign in with the
// token, wait for the pending call to appear (no reload), click Approve, and
// save a screenshot. Prints JSON of what it saw. With a fourth argument `grant`,
// approves with "this client, 10 min" for any arguments, says GRANTED on stderr once
// the grant is listed, waits for a line on stdin, then clicks Revoke.
import { chromium } from "playwright-core";

import { createInterface } from "node:readline";

const [adminUrl, token, screenshot, mode] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 60000);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  await page.goto(adminUrl + "/");
  await page.fill("#token", token);
  await page.click("#loginform button");
  // Tell the test we are signed in and watching; the call is made after this line.
  console.error("READY");
  const card = page.locator("[data-approval]").first();
  await card.waitFor({ timeout: 30000 });
  const tool = await card.locator(".tool").innerText();
  const args = await card.locator("pre").innerText();
  const meta = await card.locator(".meta").allInnerTexts();
  const left = await card.locator(".left").innerText();
  const choices = await card.locator("select[data-grant] option").allInnerTexts();
  await page.screenshot({ path: screenshot, fullPage: true });
  const seen = { tool, args, meta, left, choices };
  if (mode === "grant") {
    await card.locator("select[data-grant]").selectOption("client:10m");
    await card.locator("input[data-any-arguments]").check();
  }
  await card.locator("button[data-action=approve]").click();
  await page.locator(".badge.approved").first().waitFor({ timeout: 15000 });
  if (mode === "grant") {
    const row = page.locator("tr[data-grant-id]").first();
    await row.waitFor({ timeout: 15000 });
    seen.grant = await row.innerText();
    console.error("GRANTED " + await row.getAttribute("data-grant-id"));
    await createInterface({ input: process.stdin })[Symbol.asyncIterator]().next();
    await row.locator("button[data-revoke]").click();
    await page.locator("tr[data-grant-id]").first().waitFor({ state: "detached", timeout: 15000 });
    seen.revoked = true;
  }
  seen.live = await page.locator("#statustext").innerText();
  console.log(JSON.stringify(seen));
} finally {
  clearTimeout(timer);
  await browser.close();
}
