// Node clients the end-to-end tests run, unmodified, inside the sandbox.
// Keys come from the environment and base URLs are the SDKs' defaults; one
// JSON line per result or streamed event, written as it arrives.
import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const scenarios = {
  async 'anthropic-create'() {
    const anthropic = new Anthropic({ timeout: 30_000, maxRetries: 0 });
    const msg = await anthropic.messages.create({
      model: 'claude-opus-4-20250514',
      max_tokens: 1024,
      messages: [{ role: 'user', content: 'Hello, Claude' }],
    });
    out({ kind: 'result', type: msg.type, text: msg.content[0].text });
  },
  async 'anthropic-stream'() {
    const anthropic = new Anthropic({ timeout: 30_000, maxRetries: 0 });
    const stream = anthropic.messages.stream({
      model: 'claude-opus-4-20250514',
      max_tokens: 1024,
      messages: [{ role: 'user', content: 'Hello, Claude' }],
    });
    for await (const event of stream) out({ kind: 'event', type: event.type });
    const final = await stream.finalMessage();
    out({ kind: 'result', text: final.content[0].text });
  },
  async 'openai-responses'() {
    const client = new OpenAI({ timeout: 30_000, maxRetries: 0 });
    const response = await client.responses.create({
      model: 'gpt-4.1',
      input: 'Write a one-sentence bedtime story about a unicorn.',
    });
    out({ kind: 'result', text: response.output_text });
  },
  async 'openai-chat-stream'() {
    const client = new OpenAI({ timeout: 30_000, maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model: 'gpt-4o-mini',
      messages: [{ role: 'user', content: 'Say hello' }],
      stream: true,
    });
    let text = '';
    for await (const chunk of stream) {
      out({ kind: 'event', type: 'chunk' });
      text += chunk.choices[0]?.delta?.content ?? '';
    }
    out({ kind: 'result', text });
  },
};

await scenarios[process.argv[2]]();
