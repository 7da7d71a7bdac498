"""The token estimator against real tokenizer counts, and its additivity."""
# ruff: noqa: E501, RUF001

import unicodedata

import pytest

from service import tokens
from service.domain import Message, Role
from service.tokens import (
    PER_MESSAGE_OVERHEAD,
    PER_REQUEST_OVERHEAD,
    estimate_message_tokens,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

# Reference counts measured offline with tiktoken-compatible cl100k_base and o200k_base
# encoders (the PyPI package bpe-openai); the estimator must never count fewer tokens
# than the larger of the two, and should not waste more than about half the window.
# Beyond English, code and CJK: scripts the vocabularies cover well or poorly (where a
# token is often a single UTF-8 byte), text in NFD, all-caps, long rare words, keys,
# hashes, base64, emoji sequences, math and whitespace runs.
SAMPLES = [
    pytest.param(
        "The gateway keeps a pool of connections to each upstream provider and retries failed requests with capped exponential backoff. When a caller sends a conversation that is longer than the model's context window, the gateway either rejects it with a clear error or drops the oldest turns, keeping every system message and the latest question. Costs are computed from the usage the provider reports, and summed per tenant, model and label.",
        80,
        80,
        id="english",
    ),
    pytest.param(
        'Run `llm-gateway batch input.jsonl -o output.jsonl --concurrency 50`; each line is {"id": "item-42", "request": {"model": "deepseek-chat"}}. HTTP/2 keep-alive=30s, p99 latency 1,234.5 ms (2025-11-28T20:24:50Z).',
        79,
        79,
        id="english_technical",
    ),
    pytest.param(
        "Cổng kết nối giữ một nhóm kết nối tới mỗi nhà cung cấp và thử lại các yêu cầu thất bại với thời gian chờ tăng dần. Khi người gọi gửi một cuộc hội thoại dài hơn cửa sổ ngữ cảnh của mô hình, cổng sẽ từ chối với một lỗi rõ ràng hoặc bỏ đi những lượt cũ nhất, giữ lại mọi thông điệp hệ thống và câu hỏi mới nhất. Chi phí được tính từ số token mà nhà cung cấp báo cáo.",
        179,
        101,
        id="vietnamese",
    ),
    pytest.param(
        "网关为每个上游提供商维护一个连接池，并以带上限的指数退避重试失败的请求。当调用者发送的对话超过模型的上下文窗口时，网关要么以明确的错误拒绝它，要么丢弃最早的轮次，保留所有系统消息和最新的问题。费用根据提供商报告的用量计算，并按租户、模型和标签汇总。",
        129,
        93,
        id="chinese",
    ),
    pytest.param(
        "ゲートウェイは各アップストリームへの接続プールを保持し、失敗したリクエストを上限付きの指数バックオフで再試行します。会話がモデルのコンテキストウィンドウより長い場合、明確なエラーで拒否するか、最も古いターンを削除します。",
        110,
        81,
        id="japanese",
    ),
    pytest.param(
        "게이트웨이는 각 업스트림 공급자에 대한 연결 풀을 유지하고 실패한 요청을 상한이 있는 지수 백오프로 다시 시도합니다. 호출자가 모델의 컨텍스트 창보다 긴 대화를 보내면 게이트웨이는 명확한 오류로 거부하거나 가장 오래된 턴을 삭제합니다.",
        115,
        70,
        id="korean",
    ),
    pytest.param(
        "3.14159265358979 2718281828 1000000 42 7 0.000123 987654321 2026-11-28 20:24:50",
        42,
        42,
        id="numbers",
    ),
    pytest.param(
        "Done ✅ ship it 🚀🚀 — café naïve résumé Привет мир Γειά σου κόσμε",
        34,
        22,
        id="emoji_mixed",
    ),
    pytest.param(
        "መግቢያው ለእያንዳንዱ አቅራቢ የግንኙነት ገንዳ ይይዛል እና ያልተሳኩ ጥያቄዎችን እንደገና ይሞክራል። አንድ ደዋይ ከሞዴሉ የአውድ መስኮት የሚረዝም ውይይት ሲልክ፣ መግቢያው በግልጽ ስህተት ይከለክለዋል ወይም በጣም የቆዩትን ተራዎች ይጥላል፤ ሁሉንም የስርዓት መልዕክቶች እና የመጨረሻውን ጥያቄ ይይዛል።",
        462,
        346,
        id="amharic",
    ),
    pytest.param(
        unicodedata.normalize(
            "NFD",
            "게이트웨이는 각 업스트림 공급자에 대한 연결 풀을 유지하고 실패한 요청을 상한이 있는 지수 백오프로 다시 시도합니다. 호출자가 모델의 컨텍스트 창보다 긴 대화를 보내면 게이트웨이는 명확한 오류로 거부하거나 가장 오래된 턴을 삭제합니다.",
        ),
        709,
        743,
        id="korean_jamo",
    ),
    pytest.param(
        "კარიბჭე ინახავს კავშირების აუზს თითოეული პროვაიდერისთვის და ხელახლა ცდის წარუმატებელ მოთხოვნებს. როცა აბონენტი აგზავნის საუბარს, რომელიც მოდელის კონტექსტის ფანჯარაზე გრძელია, კარიბჭე მას უარყოფს ნათელი შეცდომით ან შლის უძველეს რეპლიკებს.",
        442,
        93,
        id="georgian",
    ),
    pytest.param(
        "Դարպասը պահպանում է կապերի խումբ յուրաքանչյուր մատակարարի համար և կրկին փորձում է ձախողված հարցումները։ Երբ զանգահարողը ուղարկում է զրույց, որը ավելի երկար է, քան մոդելի համատեքստի պատուհանը, դարպասը մերժում է այն հստակ սխալով կամ ջնջում է ամենահին հերթերը։",
        474,
        89,
        id="armenian",
    ),
    pytest.param(
        "நுழைவாயில் ஒவ்வொரு வழங்குநருக்கும் இணைப்புகளின் தொகுப்பை வைத்திருக்கிறது மற்றும் தோல்வியுற்ற கோரிக்கைகளை மீண்டும் முயற்சிக்கிறது. அழைப்பாளர் மாதிரியின் சூழல் சாளரத்தை விட நீளமான உரையாடலை அனுப்பினால், நுழைவாயில் அதை தெளிவான பிழையுடன் நிராகரிக்கிறது.",
        344,
        85,
        id="tamil",
    ),
    pytest.param(
        "השער שומר על מאגר חיבורים לכל ספק ומנסה שוב בקשות שנכשלו עם המתנה מעריכית מוגבלת. כאשר מתקשר שולח שיחה ארוכה מחלון ההקשר של המודל, השער דוחה אותה עם שגיאה ברורה או משמיט את התורות הישנות ביותר, תוך שמירה על כל הודעות המערכת והשאלה האחרונה.",
        221,
        84,
        id="hebrew",
    ),
    pytest.param(
        "गेटवे प्रत्येक अपस्ट्रीम प्रदाता के लिए कनेक्शनों का एक पूल रखता है और विफल अनुरोधों को सीमित घातांकीय प्रतीक्षा के साथ फिर से आज़माता है। जब कोई कॉलर मॉडल की संदर्भ विंडो से लंबी बातचीत भेजता है, तो गेटवे उसे स्पष्ट त्रुटि के साथ अस्वीकार कर देता है या सबसे पुराने संदेश हटा देता है।",
        279,
        94,
        id="hindi",
    ),
    pytest.param(
        "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः। मामकाः पाण्डवाश्चैव किमकुर्वत सञ्जय॥ कर्मण्येवाधिकारस्ते मा फलेषु कदाचन। मा कर्मफलहेतुर्भूर्मा ते सङ्गोऽस्त्वकर्मणि॥",
        167,
        79,
        id="sanskrit",
    ),
    pytest.param(
        "गेटवे प्रत्येक पुरवठादारासाठी जोडण्यांचा संच ठेवतो आणि अयशस्वी विनंत्या मर्यादित घातांकी प्रतीक्षेसह पुन्हा पाठवतो. कॉल करणाऱ्याने मॉडेलच्या संदर्भ खिडकीपेक्षा मोठे संभाषण पाठवल्यास, गेटवे ते स्पष्ट त्रुटीसह नाकारतो.",
        223,
        82,
        id="marathi",
    ),
    pytest.param(
        "গেটওয়ে প্রতিটি সরবরাহকারীর জন্য সংযোগের একটি পুল রাখে এবং ব্যর্থ অনুরোধগুলি সীমিত সূচকীয় অপেক্ষার সাথে আবার চেষ্টা করে। কলার যখন মডেলের প্রসঙ্গ উইন্ডোর চেয়ে দীর্ঘ কথোপকথন পাঠায়, গেটওয়ে স্পষ্ট ত্রুটি দিয়ে তা প্রত্যাখ্যান করে।",
        295,
        78,
        id="bengali",
    ),
    pytest.param(
        "تحتفظ البوابة بمجموعة من الاتصالات لكل مزود وتعيد محاولة الطلبات الفاشلة مع تراجع أسي محدود. عندما يرسل المتصل محادثة أطول من نافذة السياق الخاصة بالنموذج، ترفضها البوابة بخطأ واضح أو تحذف أقدم الأدوار، مع الاحتفاظ بكل رسائل النظام والسؤال الأخير.",
        176,
        79,
        id="arabic",
    ),
    pytest.param(
        "بِسْمِ اللَّهِ الرَّحْمَٰنِ الرَّحِيمِ. الْحَمْدُ لِلَّهِ رَبِّ الْعَالَمِينَ. الرَّحْمَٰنِ الرَّحِيمِ. مَالِكِ يَوْمِ الدِّينِ. إِيَّاكَ نَعْبُدُ وَإِيَّاكَ نَسْتَعِينُ.",
        146,
        102,
        id="arabic_vocalised",
    ),
    pytest.param(
        "دروازه برای هر ارائه‌دهنده مجموعه‌ای از اتصال‌ها نگه می‌دارد و درخواست‌های ناموفق را با انتظار نمایی محدود دوباره امتحان می‌کند. وقتی فراخواننده گفتگویی طولانی‌تر از پنجره زمینه مدل بفرستد، دروازه آن را با خطای روشن رد می‌کند.",
        168,
        71,
        id="persian",
    ),
    pytest.param(
        "เกตเวย์จะเก็บกลุ่มการเชื่อมต่อไปยังผู้ให้บริการแต่ละรายและลองส่งคำขอที่ล้มเหลวอีกครั้งโดยใช้การรอแบบเอ็กซ์โพเนนเชียลที่มีขีดจำกัด เมื่อผู้เรียกส่งบทสนทนาที่ยาวกว่าหน้าต่างบริบทของโมเดล เกตเวย์จะปฏิเสธด้วยข้อผิดพลาดที่ชัดเจนหรือลบรอบที่เก่าที่สุดออก",
        230,
        113,
        id="thai",
    ),
    pytest.param(
        "Η πύλη διατηρεί μια δεξαμενή συνδέσεων προς κάθε πάροχο και επαναλαμβάνει τα αποτυχημένα αιτήματα με περιορισμένη εκθετική αναμονή. Όταν ένας καλών στέλνει μια συνομιλία μεγαλύτερη από το παράθυρο περιβάλλοντος του μοντέλου, η πύλη την απορρίπτει με σαφές σφάλμα ή διαγράφει τους παλαιότερους γύρους.",
        262,
        103,
        id="greek",
    ),
    pytest.param(
        "Шлюз держит пул соединений с каждым провайдером и повторяет неудачные запросы с ограниченной экспоненциальной задержкой. Когда клиент отправляет диалог длиннее контекстного окна модели, шлюз отклоняет его с понятной ошибкой или удаляет самые старые реплики, сохраняя все системные сообщения и последний вопрос.",
        128,
        78,
        id="russian",
    ),
    pytest.param(
        "Шлюз підтримує пул з'єднань з кожним постачальником і повторює невдалі запити з обмеженою експоненційною затримкою. Коли абонент надсилає розмову, довшу за контекстне вікно моделі, шлюз відхиляє її зі зрозумілою помилкою або видаляє найстаріші репліки, зберігаючи всі системні повідомлення.",
        179,
        106,
        id="ukrainian",
    ),
    pytest.param(
        "Brama utrzymuje pulę połączeń do każdego dostawcy i ponawia nieudane żądania z ograniczonym wykładniczym opóźnieniem. Gdy wywołujący wyśle rozmowę dłuższą niż okno kontekstu modelu, brama odrzuca ją z czytelnym błędem albo usuwa najstarsze tury, zachowując wszystkie wiadomości systemowe i ostatnie pytanie.",
        119,
        100,
        id="polish",
    ),
    pytest.param(
        "Brána udržuje fond spojení ke každému poskytovateli a opakuje neúspěšné požadavky s omezeným exponenciálním čekáním. Když volající pošle konverzaci delší než kontextové okno modelu, brána ji odmítne se srozumitelnou chybou nebo smaže nejstarší tahy a ponechá všechny systémové zprávy i poslední otázku.",
        135,
        96,
        id="czech",
    ),
    pytest.param(
        "Das Gateway hält für jeden Anbieter einen Verbindungspool und wiederholt fehlgeschlagene Anfragen mit begrenztem exponentiellem Backoff. Überschreitet eine Unterhaltung das Kontextfenster des Modells, lehnt das Gateway sie mit einer verständlichen Fehlermeldung ab oder löscht die ältesten Beiträge, wobei alle Systemnachrichten und die letzte Frage erhalten bleiben.",
        98,
        77,
        id="german",
    ),
    pytest.param(
        "La passerelle conserve un ensemble de connexions vers chaque fournisseur et réessaie les requêtes échouées avec une attente exponentielle plafonnée. Lorsqu'un appelant envoie une conversation plus longue que la fenêtre de contexte du modèle, la passerelle la refuse avec une erreur claire ou supprime les tours les plus anciens.",
        81,
        67,
        id="french",
    ),
    pytest.param(
        unicodedata.normalize(
            "NFD",
            "La passerelle conserve un ensemble de connexions vers chaque fournisseur et réessaie les requêtes échouées avec une attente exponentielle plafonnée. Lorsqu'un appelant envoie une conversation plus longue que la fenêtre de contexte du modèle, la passerelle la refuse avec une erreur claire ou supprime les tours les plus anciens.",
        ),
        94,
        80,
        id="french_decomposed",
    ),
    pytest.param(
        unicodedata.normalize(
            "NFD",
            "Cổng kết nối giữ một nhóm kết nối tới mỗi nhà cung cấp và thử lại các yêu cầu thất bại với thời gian chờ tăng dần. Khi người gọi gửi một cuộc hội thoại dài hơn cửa sổ ngữ cảnh của mô hình, cổng sẽ từ chối với một lỗi rõ ràng hoặc bỏ đi những lượt cũ nhất, giữ lại mọi thông điệp hệ thống và câu hỏi mới nhất. Chi phí được tính từ số token mà nhà cung cấp báo cáo.",
        ),
        384,
        305,
        id="vietnamese_decomposed",
    ),
    pytest.param(
        # "Zalgo" text: four combining marks stacked on every character, spaces included.
        "".join(
            char + "".join(chr(0x300 + (i * 7 + j * 13) % 0x70) for j in range(4))
            for i, char in enumerate("the gateway counts every mark")
        ),
        259,
        253,
        id="stacked_combining_marks",
    ),
    pytest.param(
        "Ağ geçidi her sağlayıcı için bir bağlantı havuzu tutar ve başarısız istekleri sınırlı üstel bekleme ile yeniden dener. Çağıran, modelin bağlam penceresinden uzun bir konuşma gönderdiğinde, ağ geçidi onu açık bir hatayla reddeder ya da en eski turları siler; tüm sistem mesajlarını ve son soruyu korur.",
        108,
        87,
        id="turkish",
    ),
    pytest.param(
        "Az átjáró minden szolgáltatóhoz kapcsolatkészletet tart fenn, és a sikertelen kéréseket korlátozott exponenciális várakozással újrapróbálja. Ha a hívó a modell kontextusablakánál hosszabb beszélgetést küld, az átjáró érthető hibával elutasítja, vagy törli a legrégebbi fordulókat.",
        121,
        94,
        id="hungarian",
    ),
    pytest.param(
        "ＴＨＥ　ＧＡＴＥＷＡＹ　ｋｅｅｐｓ　ａ　ｐｏｏｌ　ｏｆ　ｃｏｎｎｅｃｔｉｏｎｓ　ｔｏ　ｅａｃｈ　ｕｐｓｔｒｅａｍ　ｐｒｏｖｉｄｅｒ，　ｒｅｔｒｉｅｓ　ｆａｉｌｅｄ　ｒｅｑｕｅｓｔｓ　ａｎｄ　ｌｏｇｓ　ｅｒｒｏｒ　ｃｏｄｅ　４２９．",
        207,
        183,
        id="fullwidth",
    ),
    pytest.param(
        "THE GATEWAY KEEPS A POOL OF CONNECTIONS TO EACH UPSTREAM PROVIDER AND RETRIES FAILED REQUESTS WITH CAPPED EXPONENTIAL BACKOFF. WHEN A CALLER SENDS A CONVERSATION THAT IS LONGER THAN THE MODEL'S CONTEXT WINDOW, THE GATEWAY EITHER REJECTS IT WITH A CLEAR ERROR OR DROPS THE OLDEST TURNS, KEEPING EVERY SYSTEM MESSAGE.",
        84,
        85,
        id="all_caps",
    ),
    pytest.param(
        "Floccinaucinihilipilification, antidisestablishmentarianism and pneumonoultramicroscopicsilicovolcanoconiosis are famously long; so are supercalifragilisticexpialidocious, hippopotomonstrosesquippedaliophobia, incomprehensibilities, uncharacteristically, counterrevolutionaries, electroencephalographically, psychophysicotherapeutics and thyroparathyroidectomized.",
        94,
        93,
        id="long_words",
    ),
    pytest.param(
        "The sesquipedalian lexicographer's quixotic perspicacity notwithstanding, his obfuscatory circumlocutions and grandiloquent tergiversations exasperated the phlegmatic, pusillanimous bureaucrats, whose sycophantic obsequiousness and pettifogging recalcitrance engendered interminable, labyrinthine imbroglios.",
        80,
        77,
        id="rare_words",
    ),
    pytest.param(
        "getHTTPResponseCode XMLHttpRequest parseJSONToDict maxTokensPerMinute isUpstreamRateLimited OAuth2ClientCredentials IOError NSURLSessionDataTask kCFStreamErrorDomainSSL ToStringOrDefault HTMLElementTagNameMap setUTCFullYear",
        40,
        46,
        id="mixed_case_identifiers",
    ),
    pytest.param(
        "max_tokens_per_minute = config.get_int('upstream.rate_limit.max_tokens_per_minute', default=DEFAULT_MAX_TOKENS_PER_MINUTE); _PER_MESSAGE_OVERHEAD_TOKENS, __init_subclass__, is_retryable_status_code",
        46,
        50,
        id="snake_case",
    ),
    pytest.param(
        'def backoff_s(attempt: int, retry_after_s: float | None) -> float:\n    """Seconds to wait before the next attempt."""\n    if retry_after_s is not None:\n        return min(retry_after_s, MAX_RETRY_AFTER_S)\n    delay = min(INITIAL_DELAY_S * 2**attempt, MAX_DELAY_S)\n    return delay * (1 - 0.25 * random.random())\n\n\nclass Breaker:\n    def __init__(self, *, threshold: int = 5) -> None:\n        self._failures: dict[str, int] = {}\n',
        121,
        122,
        id="python_code",
    ),
    pytest.param(
        "export async function* streamCompletion(req, { signal } = {}) {\n\tconst res = await fetch(`${BASE_URL}/v1/chat/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${apiKey}` }, body: JSON.stringify({ ...req, stream: true }), signal });\n\tif (!res.ok) throw new HttpError(res.status, await res.text());\n\tfor await (const chunk of res.body) yield decoder.decode(chunk);\n}\n",
        100,
        101,
        id="javascript_code",
    ),
    pytest.param(
        '{"id":"chatcmpl-9xKq2","object":"chat.completion","created":1764361490,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15},"system_fingerprint":"fp_0ba0d124f1"}',
        96,
        97,
        id="json",
    ),
    pytest.param(
        '{\n  "tenants": [\n    {\n      "name": "acme",\n      "budget_usd": 125.5,\n      "models": ["deepseek-chat", "gpt-4o"],\n      "limits": {"rpm": 600, "tpm": 150000}\n    }\n  ]\n}',
        67,
        67,
        id="json_pretty",
    ),
    pytest.param(
        "https://api.openai.com/v1/chat/completions?stream=true https://github.com/encode/httpx/blob/master/httpx/_transports/default.py#L57 http://127.0.0.1:8080/healthz?verbose=1&probe=liveness https://docs.python.org/3/library/asyncio-task.html#asyncio.TaskGroup s3://llm-batch-inputs/2025/11/28/input-00042.jsonl",
        98,
        98,
        id="urls",
    ),
    pytest.param(
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 commit 7d9913b4e1c2a0f5d3b6e8a9c1f2d4e6b8a0c2e4 uuid 3f2a9c1e-84b7-4d2f-9a6e-0c5b7d1e2f3a 0xDEADBEEF 0x7fff5fbff8a0",
        140,
        140,
        id="hex",
    ),
    pytest.param(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg== eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        162,
        156,
        id="base64",
    ),
    pytest.param(
        "sk-proj-Xk9qPz2mVb7RtLw4NcYh8JfDs3GaUe6Q api_key=hf_kQwZrTbYxPlMnVcJsDgHfAeUiOo AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        90,
        85,
        id="random_key",
    ),
    pytest.param(
        "👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🧑🏿‍🤝‍🧑🏻 👨‍👨‍👧 🏃‍♀️‍➡️ ❤️‍🔥 🐻‍❄️ 👁️‍🗨️ 🧔🏾‍♂️",
        114,
        81,
        id="zwj_emoji",
    ),
    pytest.param(
        "🇺🇸 🇬🇧 🇫🇷 🇩🇪 🇯🇵 🇰🇷 🇨🇳 🇮🇳 🇧🇷 🇿🇦 🇺🇦 🇪🇺 🏴󠁧󠁢󠁳󠁣󠁴󠁿 🇻🇳 🇪🇹",
        105,
        83,
        id="flag_emoji",
    ),
    pytest.param(
        "Shipped 🚀 the fix 🎉🎉🎉 thanks @ana 🙏 — tests ✅ lint ✅ docs ⚠️ coffee ☕☕ 🔥🔥🔥 #release 💯 😂😂😂 👍🏽👍🏽",
        68,
        48,
        id="emoji_text",
    ),
    pytest.param(
        "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε. ∑ᵢ₌₁ⁿ i² = n(n+1)(2n+1)/6, ∫₀^∞ e^(−x²) dx = √π⁄2, A ⊆ B ∪ C, x ∈ ℝⁿ, ∇·E = ρ/ε₀, ∮ B·dℓ = μ₀I, ℵ₀ < 2^ℵ₀, P(A∩B) ≤ min{P(A), P(B)}, ⌈x⌉ ≠ ⌊x⌋ ⟺ x ∉ ℤ.",
        162,
        168,
        id="math_symbols",
    ),
    pytest.param(
        "\\begin{align} \\mathcal{L}(\\theta) &= -\\sum_{i=1}^{N} \\log p_\\theta(y_i \\mid x_i) + \\lambda \\lVert \\theta \\rVert_2^2 \\\\ \\nabla_\\theta \\mathcal{L} &= \\frac{\\partial}{\\partial \\theta} \\mathbb{E}_{x \\sim \\mathcal{D}}[\\ell(x)] \\end{align}",
        101,
        99,
        id="latex",
    ),
    pytest.param(
        "a                                                                                                                                                                                                        b\n\n\n\n\n\n\n\n\n\n\t\t\t\t\t\t\t\tc\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nd \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t \t e",
        40,
        41,
        id="whitespace",
    ),
    pytest.param(
        "!!!!!!!!!! ?????????? ........ ---------- ========== ********** ~~~~~~~~ ##### ||||| <<<<>>>> ((((((())))))) [[[[]]]] {{{{}}}} ;;;;;;; ,,,,,,,,, ''''''' \"\"\"\"\"\" ``` ___",
        47,
        44,
        id="punctuation",
    ),
    pytest.param(
        "| tenant | model | requests | cost (USD) |\n|--------|-------|---------:|-----------:|\n| acme | deepseek-v4 | 1,204 | 12.50 |\n| globex | gpt-4o-mini | 98 | 0.31 |\n\n--------------------------------------------------------------------------------\n",
        63,
        63,
        id="markdown_table",
    ),
    pytest.param(
        "Release notes\n================================================================================\n\nContents\n1. Caching ............................................................ 4\n2. Budgets ........................................................... 9\n\n########################################################################\n# generated: do not edit\n########################################################################\n**************************************** ~~~~~~~~~~~~~~~~~~~~ ______________________________ //////////////////// ++++++++++++ %%%%%%%%%%%%",
        53,
        52,
        id="rules_and_leaders",
    ),
    pytest.param(
        "┌──────────┬──────────┐\n│ tenant   │ cost     │\n├──────────┼──────────┤\n│ acme     │ $12.50   │\n└──────────┴──────────┘ ▲▼◆●○■□★☆→←↑↓",
        70,
        64,
        id="box_drawing",
    ),
    pytest.param(
        "请求失败：HTTP 429（速率限制），请在 30 秒后重试。错误码「E_RATE」见《接口文档》第 4.2 节——参见 https://example.com/docs。",
        53,
        47,
        id="cjk_punct_mixed",
    ),
    pytest.param(
        "ច្រកចេញចូលរក្សាទុកការតភ្ជាប់ ເກດເວຍເກັບການເຊື່ອມຕໍ່ ဂိတ်ဝေးသည် ချိတ်ဆက်မှုများကို ထိန်းသိမ်းထားသည်",
        186,
        82,
        id="khmer_lao_myanmar",
    ),
    pytest.param(
        "ද්වාරය සෑම සැපයුම්කරුවෙකු සඳහාම සම්බන්ධතා සංචිතයක් තබා ගනී. గేట్‌వే ప్రతి ప్రొవైడర్ కోసం కనెక్షన్‌ల పూల్‌ను ఉంచుతుంది.",
        210,
        59,
        id="sinhala_telugu",
    ),
    pytest.param(
        "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ ᚠᚢᚦᚨᚱᚲ ᚷᚹᚺᚾᛁᛃ 𐌲𐌿𐍄𐌹𐍃𐌺 𐌰𐍂𐌽𐌰𐌹",
        109,
        112,
        id="cherokee_runic_gothic",
    ),
    pytest.param(
        "La pasarela mantiene un conjunto de conexiones con cada proveedor y reintenta las solicitudes fallidas con una espera exponencial limitada. Cuando un cliente envía una conversación más larga que la ventana de contexto del modelo, la pasarela la rechaza con un error claro o elimina los turnos más antiguos, conservando todos los mensajes del sistema.",
        83,
        69,
        id="spanish",
    ),
    pytest.param(
        "O gateway mantém um conjunto de conexões com cada provedor e repete as solicitações que falharam com uma espera exponencial limitada. Quando um chamador envia uma conversa mais longa do que a janela de contexto do modelo, o gateway a recusa com um erro claro ou descarta os turnos mais antigos, preservando todas as mensagens do sistema.",
        84,
        73,
        id="portuguese",
    ),
    pytest.param(
        "Il gateway mantiene un insieme di connessioni verso ciascun fornitore e ripete le richieste non riuscite con un'attesa esponenziale limitata. Quando un chiamante invia una conversazione più lunga della finestra di contesto del modello, il gateway la rifiuta con un errore chiaro oppure elimina i turni più vecchi, conservando tutti i messaggi di sistema.",
        98,
        84,
        id="italian",
    ),
    pytest.param(
        "De gateway houdt per aanbieder een verbindingspool bij en probeert mislukte verzoeken opnieuw met een begrensde exponentiële wachttijd. Wanneer een aanroeper een gesprek stuurt dat langer is dan het contextvenster van het model, weigert de gateway het met een duidelijke foutmelding of verwijdert hij de oudste beurten.",
        92,
        71,
        id="dutch",
    ),
    pytest.param(
        "Yhdyskäytävä ylläpitää yhteysvarantoa jokaiseen palveluntarjoajaan ja yrittää epäonnistuneita pyyntöjä uudelleen rajoitetulla eksponentiaalisella odotuksella. Kun kutsuja lähettää keskustelun, joka on pidempi kuin mallin kontekstiikkuna, yhdyskäytävä hylkää sen selkeällä virheellä tai poistaa vanhimmat vuorot.",
        127,
        96,
        id="finnish",
    ),
    pytest.param(
        "Gateway menyimpan kumpulan koneksi ke setiap penyedia dan mencoba ulang permintaan yang gagal dengan penundaan eksponensial yang dibatasi. Ketika pemanggil mengirim percakapan yang lebih panjang daripada jendela konteks model, gateway menolaknya dengan kesalahan yang jelas atau menghapus giliran paling lama.",
        84,
        68,
        id="indonesian",
    ),
    pytest.param(
        "Donaudampfschifffahrtsgesellschaftskapitän, Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz, Grundstücksverkehrsgenehmigungszuständigkeitsübertragungsverordnung, Kraftfahrzeughaftpflichtversicherung, Arbeitsunfähigkeitsbescheinigung und Verbindungswiederherstellungsversuch.",
        97,
        72,
        id="german_compounds",
    ),
    pytest.param(
        "Gáttin heldur utan um tengingasafn fyrir hvern þjónustuaðila og reynir aftur misheppnaðar beiðnir með takmarkaðri veldisvaxandi bið. Þegar kallandi sendir samtal sem er lengra en samhengisgluggi líkansins hafnar gáttin því með skýrri villu eða eyðir elstu umferðunum.",
        116,
        85,
        id="icelandic",
    ),
    pytest.param(
        "Poarta păstrează un set de conexiuni către fiecare furnizor și reîncearcă cererile eșuate cu o așteptare exponențială limitată. Când un apelant trimite o conversație mai lungă decât fereastra de context a modelului, poarta o respinge cu o eroare clară sau șterge cele mai vechi replici.",
        98,
        87,
        id="romanian",
    ),
    pytest.param(
        "子曰：學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？人不知而不慍，不亦君子乎？道可道，非常道；名可名，非常名。無名天地之始，有名萬物之母。故常無欲以觀其妙，常有欲以觀其徼。此兩者同出而異名，同謂之玄，玄之又玄，眾妙之門。",
        150,
        104,
        id="classical_chinese",
    ),
]

# Over-counting wastes window; more than this factor would be careless...
MAX_OVERESTIMATE = 2.0
# ...except where the vocabularies merge what a per-character estimate cannot see: runs
# of one punctuation mark (lines of them are still counted high, a token per 8) or
# box-drawing character, and Russian, which both merge into longer tokens than other
# Cyrillic text (Ukrainian runs 1.4x).
MAX_OVERESTIMATE_BY_SAMPLE = {
    "russian": 2.25,
    "punctuation": 2.75,
    "rules_and_leaders": 2.5,
    "box_drawing": 3.0,
}


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_conservative(text, cl100k, o200k):
    """The estimate is at least the real token count of both tokenizers."""
    assert estimate_text_tokens(text) >= max(cl100k, o200k)


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_not_wasteful(request, text, cl100k, o200k):
    """The estimate stays within a small factor of the real count."""
    factor = MAX_OVERESTIMATE_BY_SAMPLE.get(request.node.callspec.id, MAX_OVERESTIMATE)
    assert estimate_text_tokens(text) <= factor * max(cl100k, o200k)


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_additive_over_paragraphs(text, cl100k, o200k):
    """Estimating two paragraphs apart never counts fewer tokens than together."""
    joined = text + "\n\n" + text
    assert estimate_text_tokens(text) * 2 + 1 >= estimate_text_tokens(joined)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("the", 1),
        ("gateway", 2),
        ("12345", 5),
        ("a, b.", 4),
        ("line\nnext", 3),
        ("测试", 3),
        ("🚀", 5),
        ("THE GATEWAY", 4),
        ("antidisestablishment", 7),
        ("getHttpResponse", 4),
        ("mNkYPh", 8),
        ("a" + " " * 40 + "b", 5),
        ("\n" * 20, 3),
        ("café", 3),
        ("Привет", 6),
        ("ሰላም", 10),
        ("-" * 4, 4),
        ("-" * 5, 4),
        ("=" * 80, 13),
        ("." * 300, 41),
        ('"' * 80, 80),
        ("-----=====", 8),
    ],
)
def test_small_texts(text, expected):
    """Words, case flips, digits, punctuation, whitespace runs and scripts cost what the rules say."""
    assert estimate_text_tokens(text) == expected


def test_prompt_estimate_adds_overheads():
    """A prompt costs its messages plus per-message and per-request overhead."""
    messages = [Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Say hi")]
    expected = PER_REQUEST_OVERHEAD + sum(
        PER_MESSAGE_OVERHEAD + estimate_text_tokens(m.content) for m in messages
    )
    assert estimate_prompt_tokens(messages) == expected
    assert estimate_message_tokens(messages[0]) == PER_MESSAGE_OVERHEAD + 4


def test_a_long_text_is_estimated_once_while_remembered(monkeypatch):
    """A text past the memo's bound is remembered by identity: validation and fitting
    estimate the same prompt object, and 4 MiB cost up to a second a pass. Another object
    with the same characters is estimated on its own, to the same figure; the entries
    are bounded."""
    passes = []
    estimate = tokens._estimate
    monkeypatch.setattr(tokens, "_estimate", lambda text: passes.append(text) or estimate(text))
    long_text = "word " * (tokens._MEMO_MAX_CHARS // 4)
    figure = estimate_text_tokens(long_text)
    assert estimate_text_tokens(long_text) == figure
    assert len(passes) == 1
    twin = "".join(["word "] * (tokens._MEMO_MAX_CHARS // 4))
    assert twin is not long_text
    assert estimate_text_tokens(twin) == figure
    assert len(passes) == 2
    others = ["x" * (tokens._MEMO_MAX_CHARS + n) for n in range(1, tokens._LONG_MEMO_SIZE + 1)]
    for other in others:
        estimate_text_tokens(other)
    estimate_text_tokens(long_text)  # forgotten for the newer ones
    assert len(passes) == 3 + tokens._LONG_MEMO_SIZE


def test_a_text_past_the_long_memos_bound_is_not_held(monkeypatch):
    """Texts longer than a default gRPC message are estimated each time rather than held
    after their call: the message limit may be raised far beyond it."""
    passes = []
    estimate = tokens._estimate
    monkeypatch.setattr(tokens, "_estimate", lambda text: passes.append(text) or estimate(text))
    huge = "x" * (tokens._LONG_MEMO_MAX_CHARS + 1)
    assert estimate_text_tokens(huge) == estimate_text_tokens(huge)
    assert len(passes) == 2
