import OpenAI from 'openai';

const client = new OpenAI(); // OPENAI_API_KEY=dummy

const response = await client.responses.create({
  model: process.env.OPENAI_MODEL ?? 'gpt-4o-mini',
  input: 'Write a one-sentence bedtime story about a unicorn.',
});
console.log(response.output_text);
