// Conformance: the official OpenAI Node SDK (a client nobody on fw_tier wrote)
// must be able to use fwsim exactly like Fireworks' OpenAI-compatible API.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI, { APIError } from 'openai';

const HERE = dirname(fileURLToPath(import.meta.url));
const FWSIM = process.env.FWSIM_BIN || join(HERE, '..', 'fwsim');
const KEY = 'conformance-key';
const STD = 'accounts/fireworks/models/kimi-k2p6';
const FAST = 'accounts/fireworks/routers/kimi-k2p6-turbo';

let proc, dir, client;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'fwsim-conf-'));
  const portFile = join(dir, 'port');
  proc = spawn(FWSIM, ['--port', '0', '--port-file', portFile, '--quiet',
                       '--api-key', KEY, '--time-scale', '0'], { stdio: 'ignore' });
  for (let i = 0; i < 200 && !existsSync(portFile); i++) await new Promise(r => setTimeout(r, 25));
  const port = readFileSync(portFile, 'utf8').trim();
  client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/inference/v1`, apiKey: KEY,
                        maxRetries: 0, timeout: 10000 });
});

after(() => {
  if (proc) proc.kill('SIGTERM');
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function checkCompletion(c, model, content) {
  assert.equal(c.object, 'chat.completion');
  assert.match(c.id, /^fwsim-[0-9a-f]{16}$/);
  assert.equal(c.model, model);
  assert.equal(c.choices.length, 1);
  assert.equal(c.choices[0].message.role, 'assistant');
  assert.equal(c.choices[0].message.content, content);
  assert.equal(c.choices[0].finish_reason, 'stop');
  const words = content.split(' ').length;
  assert.equal(c.usage.completion_tokens, words);
  assert.equal(c.usage.total_tokens, c.usage.prompt_tokens + c.usage.completion_tokens);
  assert.equal(typeof c.usage.prompt_tokens_details.cached_tokens, 'number');
}

test('Standard path', async () => {
  const c = await client.chat.completions.create({
    model: STD, messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'Hello  there' }],
  });
  checkCompletion(c, STD, 'Echo: Hello there');
  assert.equal(c.usage.prompt_tokens, (2 + 3) + (2 + 3));
});

test('Priority path via service_tier', async () => {
  const c = await client.chat.completions.create({
    model: STD, service_tier: 'priority', messages: [{ role: 'user', content: 'urgent question' }],
  });
  checkCompletion(c, STD, 'Echo: urgent question');
});

test('Fast path via a routers model id', async () => {
  const c = await client.chat.completions.create({
    model: FAST, messages: [{ role: 'user', content: [{ type: 'text', text: 'fast please' }] }],
  });
  checkCompletion(c, FAST, 'Echo: fast please');
});

test('max_tokens and headers through withResponse()', async () => {
  const { data, response } = await client.chat.completions.create({
    model: STD, max_tokens: 2, messages: [{ role: 'user', content: 'one two three' }],
  }).withResponse();
  assert.equal(data.choices[0].message.content, 'Echo: one');
  assert.equal(data.choices[0].finish_reason, 'length');
  assert.equal(response.headers.get('fireworks-prompt-tokens'), String(data.usage.prompt_tokens));
  assert.equal(response.headers.get('x-request-id'), data.id);
});

test('prompt caching through the user field', async () => {
  const body = { model: STD, user: 'conf-user', messages: [{ role: 'user', content: 'a b c d' }] };
  await client.chat.completions.create(body);
  const c = await client.chat.completions.create(body);
  assert.equal(c.usage.prompt_tokens_details.cached_tokens, 4);
});

test('503 overloaded surfaces as APIError 503', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: STD, messages: [{ role: 'user', content: 'x [fwsim:overload]' }] }),
    (err) => {
      assert.ok(err instanceof APIError, 'APIError');
      assert.equal(err.status, 503);
      assert.match(err.message, /Service Overloaded/);
      assert.equal(err.error?.type ?? err.type, 'service_overloaded');
      return true;
    });
});

test('503 unavailable is a different 503', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: STD, messages: [{ role: 'user', content: '[fwsim:unavailable]' }] }),
    (err) => err instanceof APIError && err.status === 503 && !/overload/i.test(err.message));
});

test('429 surfaces as RateLimitError', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: STD, messages: [{ role: 'user', content: '[fwsim:ratelimit=3]' }] }),
    (err) => err instanceof OpenAI.RateLimitError && err.status === 429 && err.headers.get('retry-after') === '3');
});

test('wrong key surfaces as AuthenticationError', async () => {
  const bad = new OpenAI({ baseURL: client.baseURL, apiKey: 'nope', maxRetries: 0 });
  await assert.rejects(
    bad.chat.completions.create({ model: STD, messages: [{ role: 'user', content: 'x' }] }),
    (err) => err instanceof OpenAI.AuthenticationError && err.status === 401);
});

// Embeddings (issue 12): the SDK's embeddings.create, with its default
// base64 encoding (decoded by the SDK) and with encoding_format float.
const EMB = 'accounts/fireworks/models/qwen3-embedding-8b';

function norm(v) { return Math.sqrt(v.reduce((s, x) => s + x * x, 0)); }

test('embeddings.create: one vector per input, in order, unit length', async () => {
  const r = await client.embeddings.create({ model: EMB, input: ['hello world', 'second input'] });
  assert.equal(r.object, 'list');
  assert.equal(r.model, EMB);
  assert.equal(r.data.length, 2);
  r.data.forEach((d, i) => {
    assert.equal(d.object, 'embedding');
    assert.equal(d.index, i);
    assert.equal(d.embedding.length, 4096);
    assert.ok(Math.abs(norm(d.embedding) - 1) < 1e-4);
  });
  assert.equal(r.usage.prompt_tokens, 4);
  assert.equal(r.usage.total_tokens, 4);
});

test('embeddings.create: dimensions, float encoding, deterministic', async () => {
  const a = await client.embeddings.create({ model: EMB, input: 'same text', dimensions: 16,
                                             encoding_format: 'float' });
  const b = await client.embeddings.create({ model: EMB, input: 'same text', dimensions: 16 });
  assert.equal(a.data[0].embedding.length, 16);
  assert.deepEqual(b.data[0].embedding.map(x => x.toFixed(5)), a.data[0].embedding.map(x => x.toFixed(5)));
  const c = await client.embeddings.create({ model: EMB, input: 'other text', dimensions: 16 });
  assert.notDeepEqual(c.data[0].embedding, b.data[0].embedding);
});

test('embeddings.create: Priority, shedding and errors as for chat', async () => {
  const p = await client.embeddings.create({ model: EMB, input: 'x [fwsim:overload]', service_tier: 'priority' });
  assert.equal(p.data.length, 1);
  await assert.rejects(client.embeddings.create({ model: EMB, input: 'x [fwsim:overload]' }),
    (err) => err instanceof APIError && err.status === 503 && /Service Overloaded/.test(err.message));
  await assert.rejects(client.embeddings.create({ model: EMB, input: '[fwsim:ratelimit=2]' }),
    (err) => err instanceof OpenAI.RateLimitError && err.headers.get('retry-after') === '2');
  await assert.rejects(client.embeddings.create({ model: STD, input: 'x' }),
    (err) => err instanceof OpenAI.NotFoundError);
  await assert.rejects(client.embeddings.create({ model: EMB, input: 'x', dimensions: 5000 }),
    (err) => err instanceof OpenAI.BadRequestError);
});
