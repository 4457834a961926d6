// The gateway identity's access to an existing Azure OpenAI account, deployed at the account's resource group
// (which may be in another subscription). The account, its deployments and network rules are left as they are.

param accountName string

@description('Principal id of the gateway\'s identity.')
param gatewayPrincipalId string

// Built-in role: Cognitive Services OpenAI User (inference calls only; no keys, no deployment management).
var cognitiveServicesOpenAIUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: accountName
}

resource gatewayOpenAIUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, gatewayPrincipalId, cognitiveServicesOpenAIUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output id string = account.id
