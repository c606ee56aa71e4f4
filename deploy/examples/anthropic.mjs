import Anthropic from '@anthropic-ai/sdk';

// The key is a dummy; proxypilot replaces it on the way out.
const anthropic = new Anthropic({ apiKey: process.env.ANTHROPIC_API_KEY ?? 'my_api_key' });

const msg = await anthropic.messages.create({
  model: process.env.ANTHROPIC_MODEL ?? 'claude-sonnet-4-5',
  max_tokens: 1024,
  messages: [{ role: 'user', content: 'Hello, Claude' }],
});
console.log(msg);
