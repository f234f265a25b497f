// The demo page in a real browser (Debian's Chromium, driven by
// playwright-core): two pages chat; one page's connection is cut while the
// other keeps talking, and it resumes without losing a message.
// Screenshots go to target/browser-artifacts/.

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { startNode, startProxy } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  "../../../target/browser-artifacts",
);
const skip = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (install Debian's chromium)`;

describe("the chat page in Chromium", { skip }, () => {
  let browser;
  let node;

  before(async () => {
    const { chromium } = await import("playwright-core");
    mkdirSync(ARTIFACTS, { recursive: true });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    node = await startNode(["--dev"]);
  });

  after(async () => {
    await browser?.close();
    await node?.stop();
  });

  async function join(url, name) {
    const page = await browser.newPage({ viewport: { width: 1000, height: 600 } });
    page.on("pageerror", (e) => {
      throw e;
    });
    await page.goto(url);
    await page.fill("#name", name);
    await page.click("#join");
    await page.waitForSelector("#status.online");
    await page.waitForSelector("#channel-title:has-text('# general')");
    return page;
  }

  async function say(page, text) {
    await page.fill("#message", text);
    await page.press("#message", "Enter");
    await page.waitForSelector(`#messages li .content:text-is("${text}")`);
  }

  const contents = (page) => page.locator("#messages li .content").allTextContents();

  test("two pages chat; a cut page resumes and misses nothing", async () => {
    const viaA = await startProxy(node.addr);
    const viaB = await startProxy(node.addr);
    const http = (proxy) => proxy.url.replace("ws://", "http://").replace("/gateway", "/");
    try {
      const alice = await join(http(viaA), "alice");
      const bob = await join(http(viaB), "bob");
      await alice.waitForSelector("#members li:text-is('bob')");

      await say(alice, "hello bob");
      await bob.waitForSelector("#messages li .content:text-is('hello bob')");
      await bob.fill("#message", "hi ali");
      await alice.waitForSelector("#typing:has-text('bob is typing')");
      await bob.press("#message", "Enter");
      await alice.waitForSelector("#messages li .content:text-is('hi ali')");
      await alice.screenshot({ path: path.join(ARTIFACTS, "1-chatting.png") });

      // Bob's network goes away while Alice keeps talking.
      viaB.refuse(true);
      viaB.cut();
      await bob.waitForSelector("#status.reconnecting");
      await bob.waitForSelector("#notice:has-text('Connection lost')");
      const missed = ["are you there?", "you are missing this", "and this"];
      for (const m of missed) await say(alice, m);
      await bob.screenshot({ path: path.join(ARTIFACTS, "2-cut-off.png") });

      viaB.refuse(false);
      await bob.waitForSelector("#notice:has-text('nothing was missed')");
      await bob.waitForSelector(`#messages li .content:text-is("and this")`);
      assert.deepEqual(await contents(bob), ["hello bob", "hi ali", ...missed]);
      assert.deepEqual(await contents(alice), await contents(bob));
      await bob.screenshot({ path: path.join(ARTIFACTS, "3-resumed.png") });

      // And the resumed page still talks.
      await say(bob, "back again");
      await alice.waitForSelector("#messages li .content:text-is('back again')");

      // Channels: Alice opens one; Bob sees it appear.
      await alice.fill("#channel-name", "browsers");
      await alice.press("#channel-name", "Enter");
      await alice.waitForSelector("#channel-title:has-text('# browsers')");
      await bob.waitForSelector("#channels li[data-channel='browsers']");
    } finally {
      await viaA.close();
      await viaB.close();
    }
  });

  test("a node with a configured secret mints no tokens: the page asks for one", async () => {
    const production = await startNode(["--jwt-secret", "a-configured-secret-a-configured-secret"]);
    try {
      const page = await browser.newPage();
      await page.goto(`${production.http}/`);
      await page.fill("#name", "eve");
      await page.click("#join");
      await page.waitForSelector("#login-error:has-text('paste one')");
      assert.equal(await page.isVisible("#token"), true);
      await page.close();
    } finally {
      await production.stop();
    }
  });
});
