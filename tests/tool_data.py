"""A tool-calling and reasoning data set for the tests: OpenAI `messages` and ShareGPT `function_call` /
`observation` records, valid and invalid, each with the exact outcome reading must give.

`ACCEPTED`: name -> (record, expected messages, expected tools). `REJECTED`: name -> (record, reason, turn,
detail). Other test modules use `ACCEPTED` as tool/reasoning conversations (`accepted_records()`).
"""

from __future__ import annotations

import json

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
FLAT_TOOLS = [WEATHER["function"], ADD["function"]]  # LLaMA-Factory's `tools`: schemas without the wrapper


def call(name, arguments, id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": id, **out} if id else out


def U(text):
    return {"role": "user", "content": text}


def A(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def T(text, **extra):
    return {"role": "tool", "content": text, **extra}


def S(text):
    return {"role": "system", "content": text}


def sg(role, value, **extra):
    return {"from": role, "value": value, **extra}


PARIS = {"city": "Paris"}
PARIS_CALL = call("get_weather", PARIS, "call_1")

ACCEPTED = {
    "call_with_object_arguments": (
        {
            "tools": TOOLS,
            "messages": [
                U("Weather in Paris?"),
                A(None, tool_calls=[PARIS_CALL]),
                T("18C, sunny", tool_call_id="call_1"),
                A("It is 18C and sunny in Paris."),
            ],
        },
        [
            U("Weather in Paris?"),
            A("", tool_calls=[PARIS_CALL]),
            T("18C, sunny", tool_call_id="call_1"),
            A("It is 18C and sunny in Paris."),
        ],
        TOOLS,
    ),
    "call_with_string_arguments_and_empty_content": (
        {
            "tools": TOOLS,
            "messages": [
                U("Weather in Paris?"),
                A("", tool_calls=[call("get_weather", '{"city": "Paris"}', "call_1")]),
                T("18C", tool_call_id="call_1"),
                A("18C."),
            ],
        },
        [U("Weather in Paris?"), A("", tool_calls=[PARIS_CALL]), T("18C", tool_call_id="call_1"), A("18C.")],
        TOOLS,
    ),
    "tools_as_json_string": (
        {
            "tools": json.dumps(TOOLS),
            "messages": [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})])],
        },
        [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})])],
        TOOLS,
    ),
    "content_absent_beside_calls": (
        {
            "messages": [
                U("2+3?"),
                {"role": "assistant", "tool_calls": [call("add", {"a": 2, "b": 3})]},
                T("5"),
                A("5"),
            ]
        },
        [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})]), T("5"), A("5")],
        None,
    ),
    "parallel_calls_with_ids": (
        {
            "tools": TOOLS,
            "messages": [
                U("Weather in Paris and Rome?"),
                A(
                    "Checking both.",
                    tool_calls=[PARIS_CALL, call("get_weather", {"city": "Rome"}, "call_2")],
                ),
                T("18C", tool_call_id="call_1"),
                T("25C", tool_call_id="call_2"),
                A("Paris 18C, Rome 25C."),
            ],
        },
        [
            U("Weather in Paris and Rome?"),
            A("Checking both.", tool_calls=[PARIS_CALL, call("get_weather", {"city": "Rome"}, "call_2")]),
            T("18C", tool_call_id="call_1"),
            T("25C", tool_call_id="call_2"),
            A("Paris 18C, Rome 25C."),
        ],
        TOOLS,
    ),
    "parallel_calls_one_result_for_both": (
        {
            "messages": [
                U("Paris and Rome?"),
                A("", tool_calls=[call("get_weather", PARIS), call("get_weather", {"city": "Rome"})]),
                T("Paris 18C; Rome 25C"),
                A("Paris 18C, Rome 25C."),
            ]
        },
        [
            U("Paris and Rome?"),
            A("", tool_calls=[call("get_weather", PARIS), call("get_weather", {"city": "Rome"})]),
            T("Paris 18C; Rome 25C"),
            A("Paris 18C, Rome 25C."),
        ],
        None,
    ),
    "flat_call_form": (
        {
            "messages": [
                U("2+3?"),
                A("", tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
                T("5"),
                A("5"),
            ]
        },
        [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})]), T("5"), A("5")],
        None,
    ),
    "reasoning_content": (
        {"messages": [U("2+2?"), A("4", reasoning_content="Two and two make four.")]},
        [U("2+2?"), A("4", reasoning_content="Two and two make four.")],
        None,
    ),
    "reasoning_key": (
        {"messages": [S("Think first."), U("2+2?"), A("4", reasoning="2+2=4")]},
        [S("Think first."), U("2+2?"), A("4", reasoning_content="2+2=4")],
        None,
    ),
    "both_reasoning_keys_equal": (
        {"messages": [U("2+2?"), A("4", reasoning="2+2=4", reasoning_content="2+2=4")]},
        [U("2+2?"), A("4", reasoning_content="2+2=4")],
        None,
    ),
    "empty_reasoning_is_none": (
        {"messages": [U("Hi"), A("Hello!", reasoning_content="")]},
        [U("Hi"), A("Hello!")],
        None,
    ),
    "reasoning_and_tool_call": (
        {
            "tools": [ADD],
            "messages": [
                U("2+3?"),
                A(
                    None,
                    reasoning_content="I should add.",
                    tool_calls=[call("add", '{"a": 2, "b": 3}', "c1")],
                ),
                T("5", tool_call_id="c1", name="add"),
                A("2+3 is 5.", reasoning_content="The tool said 5."),
            ],
        },
        [
            U("2+3?"),
            A("", reasoning_content="I should add.", tool_calls=[call("add", {"a": 2, "b": 3}, "c1")]),
            T("5", tool_call_id="c1", name="add"),
            A("2+3 is 5.", reasoning_content="The tool said 5."),
        ],
        [ADD],
    ),
    "weight_zero_and_one": (
        {"messages": [U("Hi"), A("Bad reply", weight=0), U("Again"), A("Good reply", weight=1)]},
        [U("Hi"), A("Bad reply", weight=0), U("Again"), A("Good reply")],
        None,
    ),
    "weight_as_float": (
        {"messages": [U("Hi"), A("No", weight=0.0), U("Again"), A("Yes", weight=1.0)]},
        [U("Hi"), A("No", weight=0), U("Again"), A("Yes")],
        None,
    ),
    "weight_null_is_absent": (
        {"messages": [{**U("Hi"), "weight": None}, A("Hello", weight=None)]},
        [U("Hi"), A("Hello")],
        None,
    ),
    "legacy_function_call": (
        {
            "messages": [
                U("2+3?"),
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "add", "arguments": '{"a":2,"b":3}'},
                },
                {"role": "function", "name": "add", "content": "5"},
                A("5"),
            ]
        },
        [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})]), T("5", name="add"), A("5")],
        None,
    ),
    "ends_on_a_call": (
        {"tools": TOOLS, "messages": [U("Weather in Paris?"), A("", tool_calls=[PARIS_CALL])]},
        [U("Weather in Paris?"), A("", tool_calls=[PARIS_CALL])],
        TOOLS,
    ),
    "user_after_tool_result": (
        {
            "messages": [
                U("2+3?"),
                A("", tool_calls=[call("add", {"a": 2, "b": 3})]),
                T("5"),
                U("Thanks"),
                A("Welcome"),
            ]
        },
        [U("2+3?"), A("", tool_calls=[call("add", {"a": 2, "b": 3})]), T("5"), U("Thanks"), A("Welcome")],
        None,
    ),
    "two_rounds_of_calls": (
        {
            "tools": TOOLS,
            "messages": [
                U("Paris weather, then add 2 and 3"),
                A("", tool_calls=[PARIS_CALL]),
                T("18C", tool_call_id="call_1"),
                A("", tool_calls=[call("add", {"a": 2, "b": 3}, "call_2")]),
                T("5", tool_call_id="call_2"),
                A("18C; 5."),
            ],
        },
        [
            U("Paris weather, then add 2 and 3"),
            A("", tool_calls=[PARIS_CALL]),
            T("18C", tool_call_id="call_1"),
            A("", tool_calls=[call("add", {"a": 2, "b": 3}, "call_2")]),
            T("5", tool_call_id="call_2"),
            A("18C; 5."),
        ],
        TOOLS,
    ),
    "no_tools_any_name": (
        {
            "messages": [
                U("Search cats"),
                A("", tool_calls=[call("search", {"q": "cats"})]),
                T("[]"),
                A("None."),
            ]
        },
        [U("Search cats"), A("", tool_calls=[call("search", {"q": "cats"})]), T("[]"), A("None.")],
        None,
    ),
    "empty_tools_list_and_null_arguments": (
        {
            "tools": [],
            "messages": [U("Time?"), A("", tool_calls=[call("now", None)]), T("12:00"), A("Noon.")],
        },
        [U("Time?"), A("", tool_calls=[call("now", {})]), T("12:00"), A("Noon.")],
        None,
    ),
    "tool_content_parts_and_empty_result": (
        {
            "messages": [
                U("Run both"),
                A("", tool_calls=[call("a", {}), call("b", {})]),
                T([{"type": "text", "text": "ok"}]),
                T(""),
                A("Done."),
            ]
        },
        [U("Run both"), A("", tool_calls=[call("a", {}), call("b", {})]), T("ok"), T(""), A("Done.")],
        None,
    ),
    "sharegpt_function_call_observation": (
        {
            "tools": json.dumps(FLAT_TOOLS),
            "system": "You can call tools.",
            "conversations": [
                sg("human", "Weather in Paris?"),
                sg("function_call", json.dumps({"name": "get_weather", "arguments": PARIS})),
                sg("observation", "18C"),
                sg("gpt", "It is 18C."),
            ],
        },
        [
            S("You can call tools."),
            U("Weather in Paris?"),
            A("", tool_calls=[call("get_weather", PARIS)]),
            T("18C"),
            A("It is 18C."),
        ],
        TOOLS,
    ),
    "sharegpt_text_then_call_merged": (
        {
            "tools": FLAT_TOOLS,
            "conversations": [
                sg("human", "2+3?"),
                sg("gpt", "Let me add."),
                sg("function_call", json.dumps({"name": "add", "arguments": json.dumps({"a": 2, "b": 3})})),
                sg("observation", "5"),
                sg("gpt", "5"),
            ],
        },
        [U("2+3?"), A("Let me add.", tool_calls=[call("add", {"a": 2, "b": 3})]), T("5"), A("5")],
        TOOLS,
    ),
    "sharegpt_list_of_calls": (
        {
            "conversations": [
                sg("human", "Paris and Rome?"),
                sg(
                    "function_call",
                    json.dumps(
                        [
                            {"name": "get_weather", "arguments": PARIS},
                            {"name": "get_weather", "arguments": {"city": "Rome"}},
                        ]
                    ),
                ),
                sg("observation", json.dumps(["18C", "25C"])),
                sg("gpt", "18C and 25C."),
            ]
        },
        [
            U("Paris and Rome?"),
            A("", tool_calls=[call("get_weather", PARIS), call("get_weather", {"city": "Rome"})]),
            T('["18C", "25C"]'),
            A("18C and 25C."),
        ],
        None,
    ),
    "sharegpt_weight_and_tool_role": (
        {
            "conversations": [
                sg("human", "2+3?"),
                sg("gpt", "6", weight=0),
                sg("human", "Use the tool."),
                sg("function_call", {"name": "add", "arguments": {"a": 2, "b": 3}}),
                sg("tool", "5"),
                sg("gpt", "5"),
            ]
        },
        [
            U("2+3?"),
            A("6", weight=0),
            U("Use the tool."),
            A("", tool_calls=[call("add", {"a": 2, "b": 3})]),
            T("5"),
            A("5"),
        ],
        None,
    ),
}

_CALL_THEN = {"role": "assistant", "content": None, "tool_calls": [call("add", {"a": 2, "b": 3}, "c1")]}

REJECTED = {
    "tool_first": (
        {"messages": [U("Hi"), T("5"), A("Hello")]},
        "tool_without_call",
        1,
        "no assistant turn with tool calls comes before it",
    ),
    "tool_after_plain_reply": (
        {"messages": [U("Hi"), A("Hello"), T("5")]},
        "tool_without_call",
        2,
        "no assistant turn with tool calls comes before it",
    ),
    "arguments_not_json": (
        {"messages": [U("2+3?"), A("", tool_calls=[call("add", '{"a": 2,')])]},
        "bad_tool_arguments",
        1,
        "call 0's `arguments` is not valid JSON: Expecting property name enclosed in double quotes "
        "at column 9",
    ),
    "arguments_json_list": (
        {"messages": [U("2+3?"), A("", tool_calls=[call("add", "[2, 3]")])]},
        "bad_tool_arguments",
        1,
        "call 0's `arguments` holds a JSON list, expected an object",
    ),
    "arguments_a_number": (
        {"messages": [U("2+3?"), A("", tool_calls=[call("add", 5)])]},
        "bad_tool_arguments",
        1,
        "call 0's `arguments` is a JSON integer, expected an object",
    ),
    "unknown_tool_name": (
        {"tools": TOOLS, "messages": [U("Cats?"), A("", tool_calls=[call("search", {"q": "cats"})])]},
        "unknown_tool",
        1,
        "call 0 names 'search'; the record's tools are: add, get_weather",
    ),
    "tools_an_object": (
        {"tools": WEATHER, "messages": [U("Hi"), A("Hello")]},
        "bad_tools",
        None,
        "`tools` is a JSON object, expected a list",
    ),
    "tools_bad_json_string": (
        {"tools": '[{"name": "add"', "messages": [U("Hi"), A("Hello")]},
        "bad_tools",
        None,
        "`tools` is not valid JSON: Expecting ',' delimiter at column 16",
    ),
    "tool_without_function_name": (
        {
            "tools": [{"type": "function", "function": {"description": "nameless"}}],
            "messages": [U("Hi"), A("Hello")],
        },
        "bad_tools",
        None,
        "tool 0 has no function name",
    ),
    "tools_repeat_a_name": (
        {"tools": [WEATHER, WEATHER["function"]], "messages": [U("Hi"), A("Hello")]},
        "bad_tools",
        None,
        "tool 1 repeats the name 'get_weather'",
    ),
    "tool_parameters_not_object": (
        {"tools": [{"name": "add", "parameters": "a, b"}], "messages": [U("Hi"), A("Hello")]},
        "bad_tools",
        None,
        "tool 0's `parameters` is a JSON string, expected an object",
    ),
    "weight_two": (
        {"messages": [U("Hi"), A("Hello", weight=2)]},
        "bad_weight",
        1,
        "`weight` is 2, expected 0 or 1",
    ),
    "weight_string": (
        {"messages": [U("Hi"), A("Hello", weight="0")]},
        "bad_weight",
        1,
        '`weight` is "0", expected 0 or 1',
    ),
    "weight_boolean": (
        {"messages": [U("Hi"), A("Hello", weight=False)]},
        "bad_weight",
        1,
        "`weight` is false, expected 0 or 1",
    ),
    "weight_on_user": (
        {"messages": [{**U("Hi"), "weight": 0}, A("Hello")]},
        "bad_weight",
        0,
        "`weight` is given on a user turn; it applies to assistant turns only",
    ),
    "every_reply_weight_zero": (
        {"messages": [U("Hi"), A("Hello", weight=0)]},
        "no_assistant_turn",
        None,
        "every assistant turn has weight 0: nothing to train on",
    ),
    "reasoning_not_string": (
        {"messages": [U("Hi"), A("Hello", reasoning_content=["step"])]},
        "bad_reasoning",
        1,
        "`reasoning_content` is a JSON list, expected a string",
    ),
    "reasoning_keys_differ": (
        {"messages": [U("Hi"), A("Hello", reasoning_content="a", reasoning="b")]},
        "bad_reasoning",
        1,
        "`reasoning_content` and `reasoning` are both given and differ",
    ),
    "reasoning_on_user": (
        {"messages": [{**U("Hi"), "reasoning": "hmm"}, A("Hello")]},
        "bad_reasoning",
        0,
        "`reasoning` is given on a user turn; only assistant turns reason",
    ),
    "tool_calls_not_list": (
        {"messages": [U("2+3?"), A("", tool_calls=call("add", {}))]},
        "bad_tool_calls",
        1,
        "`tool_calls` is a JSON object, expected a list",
    ),
    "call_without_name": (
        {"messages": [U("2+3?"), A("", tool_calls=[{"type": "function", "function": {"arguments": {}}}])]},
        "bad_tool_calls",
        1,
        "call 0 has no `name`; a call must name its function",
    ),
    "call_id_not_string": (
        {"messages": [U("2+3?"), A("", tool_calls=[{**call("add", {}), "id": 7}])]},
        "bad_tool_calls",
        1,
        "call 0's `id` is a JSON integer, expected a string",
    ),
    "empty_reply_no_calls": (
        {"messages": [U("Hi"), A("", reasoning_content="thinking")]},
        "empty_content",
        1,
        "the assistant turn's `content` is empty and it has no tool calls",
    ),
    "null_reply_no_calls": (
        {"messages": [U("Hi"), A(None, tool_calls=[])]},
        "content_not_string",
        1,
        "`content` is a JSON null, expected a string",
    ),
    "call_then_user": (
        {"messages": [U("2+3?"), _CALL_THEN, U("Well?"), A("5")]},
        "missing_tool_result",
        2,
        "the tool calls of turn 1 have no result",
    ),
    "result_unknown_id": (
        {"messages": [U("2+3?"), _CALL_THEN, T("5", tool_call_id="c9"), A("5")]},
        "tool_result_mismatch",
        2,
        "`tool_call_id` 'c9' matches no call",
    ),
    "more_results_than_calls": (
        {"messages": [U("2+3?"), _CALL_THEN, T("5"), T("5"), A("5")]},
        "tool_result_mismatch",
        3,
        "2 tool results for 1 call(s)",
    ),
    "result_name_mismatch": (
        {"messages": [U("2+3?"), _CALL_THEN, T("5", name="multiply"), A("5")]},
        "tool_result_mismatch",
        2,
        "`name` 'multiply' matches none of the calls",
    ),
    "result_id_not_string": (
        {"messages": [U("2+3?"), _CALL_THEN, T("5", tool_call_id=1), A("5")]},
        "bad_tool_message",
        2,
        "`tool_call_id` is a JSON integer, expected a string",
    ),
    "two_replies_after_result": (
        {"messages": [U("2+3?"), _CALL_THEN, T("5"), A("5"), A("Five")]},
        "repeated_role",
        4,
        "two assistant turns in a row (turns 3 and 4)",
    ),
    "lone_surrogate_in_arguments": (
        {"messages": [U("Hi"), A("", tool_calls=[call("echo", {"text": "\ud800"})])]},
        "bad_unicode",
        1,
        "call 0's `arguments` holds a lone surrogate U+D800 at character 0",
    ),
    "sharegpt_merged_call_then_user": (
        {
            "conversations": [
                sg("human", "2+3?"),
                sg("gpt", "Adding."),
                sg("function_call", '{"name": "add"}'),
                sg("human", "?"),
            ]
        },
        "missing_tool_result",
        3,
        "the tool calls of turn 1 have no result",
    ),
    "sharegpt_observation_first": (
        {"conversations": [sg("human", "Hi"), sg("observation", "5"), sg("gpt", "Hello")]},
        "tool_without_call",
        1,
        "no assistant turn with tool calls comes before it",
    ),
    "sharegpt_function_call_not_json": (
        {"conversations": [sg("human", "2+3?"), sg("function_call", "add(2, 3)"), sg("observation", "5")]},
        "bad_tool_calls",
        1,
        "the function_call `value` is not valid JSON: Expecting value at column 1",
    ),
    "sharegpt_unknown_function": (
        {
            "tools": json.dumps(FLAT_TOOLS),
            "conversations": [sg("human", "Hi"), sg("function_call", '{"name": "search", "arguments": {}}')],
        },
        "unknown_tool",
        1,
        "call 0 names 'search'; the record's tools are: add, get_weather",
    ),
}


def accepted_records() -> list[dict]:
    """The accepted records, each with its name as `id`, for tests that need tool/reasoning conversations."""
    return [{"id": name, **record} for name, (record, _, _) in ACCEPTED.items()]
