// The Node `openai` SDK's documented chat example, whole and streamed, against BASE_URL.
// Prints one JSON line: {whole, finish, usage, model, streamed, chunks}.
const { OpenAI } = require("openai");

async function main() {
  const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.API_KEY, maxRetries: 0 });
  const request = {
    model: process.env.MODEL,
    messages: [{ role: "user", content: "What is the capital of France?" }],
    max_tokens: 10,
    temperature: 0,
  };
  const completion = await client.chat.completions.create(request);
  const stream = await client.chat.completions.create({ ...request, stream: true });
  let streamed = "";
  let chunks = 0;
  for await (const chunk of stream) {
    streamed += chunk.choices[0]?.delta?.content || "";
    chunks += 1;
  }
  console.log(
    JSON.stringify({
      whole: completion.choices[0].message.content,
      finish: completion.choices[0].finish_reason,
      usage: completion.usage,
      model: completion.model,
      streamed,
      chunks,
    }),
  );
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
